"""Top-1 / top-5 error of a checkpoint on a prepared split, with the centre crop or the paper's ten crops.

Krizhevsky et al. 2012, section 4.1: "At test time, the network makes a prediction by extracting five 224x224
patches (the four corner patches and the center patch) as well as their horizontal reflections (hence ten
patches in all), and averaging the predictions made by the network's softmax layer on the ten patches."

    alexnet evaluate --checkpoint runs/ray/alexnet/checkpoint_... --data runs/smoke/prepared --crops 10
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from alexnet.results import PAPER_VAL_ERRORS
from pipelines.dataset import PreparedDataset

log = logging.getLogger(__name__)



def evaluate_checkpoint(
    checkpoint: str,
    data: str | PreparedDataset,
    *,
    crops: int = 1,
    split: str = "val",
    batch_size: int = 128,
    limit: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``split`` of the prepared dataset ``data``; returns errors and provenance."""
    from alexnet.data import ShardReader
    from alexnet.train import augmentation_for, checkpoint_config, errors, evaluate, load_checkpoint, model_from_checkpoint

    if crops not in (1, 10):
        raise ValueError(f"crops must be 1 or 10, not {crops}")
    state = load_checkpoint(checkpoint)
    cfg = checkpoint_config(state)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = PreparedDataset.of(data, stats=True)  # one read of the manifest and stats, shared with the reader
    data, stats, mean_image = dataset.uri, dataset.stats, dataset.mean_image()
    if state.get("stats_sha256") and stats.get("mean_image_sha256") != state["stats_sha256"]:
        log.warning("%s: statistics differ from those the checkpoint was trained with", data)
    if dataset.num_classes != state["num_classes"]:
        raise ValueError(f"{data} has {dataset.num_classes} classes; the checkpoint predicts {state['num_classes']}")
    augmentation = augmentation_for(cfg, stats, mean_image).to(dev)
    model = model_from_checkpoint(state).to(dev)
    reader = ShardReader(dataset, split, batch_size=batch_size, shuffle=False, limit=limit)
    result = errors(evaluate(model, reader, augmentation, device=dev, crops=crops))
    return {
        **result,
        "crops": crops,
        "split": split,
        "images": reader.num_rows,
        "epoch": state["epoch"],
        "checkpoint": checkpoint,
        "data": data,
        "data_manifest_sha256": dataset.manifest_sha256,
        "trained_on_manifest_sha256": state.get("data_manifest_sha256"),
        "mlflow_run_id": state.get("mlflow_run_id"),
        "paper": PAPER_VAL_ERRORS,
    }


def log_evaluation(result: dict[str, Any], *, tracking_uri: str | None = None, experiment: str = "alexnet") -> str:
    """Record an evaluation in MLflow: as metrics of the training run that made the checkpoint when it is in
    this store, else in a new run. Returns the run id."""
    from alexnet.tracking import RunLogger, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    run_id = result.get("mlflow_run_id")
    if run_id:
        import mlflow

        try:
            mlflow.MlflowClient(uri).get_run(run_id)
        except Exception:  # the checkpoint was trained against another store
            run_id = None
    logger = RunLogger(uri, experiment, run_name=f"evaluate-{result['split']}-{result['crops']}crop", run_id=run_id)
    suffix = f"{result['split']}_{result['crops']}crop"
    logger.log_metrics({f"eval_{suffix}_top1_err": result["top1_err"], f"eval_{suffix}_top5_err": result["top5_err"]},
                       step=int(result["epoch"]))
    logger.log_dict(result, f"evaluation_{suffix}.json")
    logger.end()  # a reopened training run goes back to FINISHED
    return logger.run_id
