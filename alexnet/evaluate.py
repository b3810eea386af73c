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

from alexnet.results import PAPER_VAL_ERRORS, class_tables
from pipelines.dataset import PreparedDataset

log = logging.getLogger(__name__)

#: The most confused (true, predicted) class pairs an evaluation reports.
CONFUSED_PAIRS = 20


class ClassTally:
    """Per-class counts of an evaluation (``alexnet.train.evaluate``'s ``on_scores``): images, top-5 misses, and
    the confusion matrix of top-1 predictions (rows: true class, columns: predicted)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.top5_misses = torch.zeros(num_classes, dtype=torch.int64)

    def __call__(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        c = self.num_classes
        scores, labels = scores.detach().float().cpu(), labels.detach().cpu().long()
        predicted = scores.argmax(dim=1)
        self.confusion += torch.bincount(labels * c + predicted, minlength=c * c).view(c, c)
        top5 = scores.topk(min(5, c), dim=1).indices
        missed = ~(top5 == labels[:, None]).any(dim=1)
        self.top5_misses += torch.bincount(labels[missed], minlength=c)

    def per_class(self, classes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per class: label, wnid, words, images, top-1 and top-5 error (None for a class without images)."""
        images = self.confusion.sum(dim=1)
        rows = []
        for c in classes:
            i = int(c["label"])
            n = int(images[i])
            top1 = (n - int(self.confusion[i, i])) / n if n else None
            rows.append({"label": i, "wnid": c.get("wnid", ""), "words": c.get("words", ""), "images": n,
                         "top1_err": top1, "top5_err": int(self.top5_misses[i]) / n if n else None})
        return rows

    def confused_pairs(self, classes: list[dict[str, Any]], limit: int = CONFUSED_PAIRS) -> list[dict[str, Any]]:
        """The ``limit`` most frequent (true, predicted) pairs of top-1 mistakes, most frequent first."""
        by_label = {int(c["label"]): c for c in classes}
        off = self.confusion.clone()
        off.fill_diagonal_(0)
        counts, flat = off.flatten().sort(descending=True, stable=True)
        pairs = []
        for count, index in zip(counts.tolist()[:limit], flat.tolist()[:limit]):
            if count == 0:
                break
            t, p = divmod(index, self.num_classes)
            pairs.append({"true_label": t, "true_wnid": by_label.get(t, {}).get("wnid", ""),
                          "true_words": by_label.get(t, {}).get("words", ""), "predicted_label": p,
                          "predicted_wnid": by_label.get(p, {}).get("wnid", ""),
                          "predicted_words": by_label.get(p, {}).get("words", ""), "count": count})
        return pairs


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
    tally = ClassTally(state["num_classes"])
    result = errors(evaluate(model, reader, augmentation, device=dev, crops=crops, on_scores=tally))
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
        "per_class": tally.per_class(dataset.manifest["classes"]),
        "confused_pairs": tally.confused_pairs(dataset.manifest["classes"]),
    }


def log_evaluation(result: dict[str, Any], *, tracking_uri: str | None = None, experiment: str = "alexnet") -> str:
    """Record an evaluation in MLflow: as metrics of the training run that made the checkpoint when it is in
    this store, else in a new run, with the per-class error table and the most confused class pairs as MLflow
    tables (``class_tables``). Returns the run id."""
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
    for name, table in class_tables(result).items():
        logger.log_table(table, name)
    logger.end()  # a reopened training run goes back to FINISHED
    return logger.run_id
