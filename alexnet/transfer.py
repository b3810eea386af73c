"""Transfer learning from an ImageNet checkpoint to Caltech-101, Oxford Flowers-102 and PASCAL VOC 2007.

The datasets' standard protocols (``protocol_splits``):

Caltech-101 (Fei-Fei et al. 2004; as in Zeiler & Fergus 2013 and DeCAF)
    30 training images per class, the rest, at most 50 per class, for testing; mean per-class accuracy, averaged
    over 5 seeded random splits, with its standard deviation. C is chosen on 5 images per class held out of the 30.
Oxford Flowers-102 (Nilsback & Zisserman 2008)
    train on ``trnid``, choose C on ``valid``, refit on train+val, test on ``tstid``; mean per-class accuracy.
PASCAL VOC 2007 classification
    train on ``train``, choose C on ``val``, refit on trainval, test on ``test``; per-class AP and mAP with the
    VOC2007 11-point interpolated AP (difficult examples ignored), the area-under-curve AP (VOC2010+) beside it.

Two methods, from any ImageNet checkpoint (one of ours, or torchvision-variant weights, ``load_backbone``):

``probe``
    DeCAF-style linear probe: centre-crop activations of fc7 (and fc6), extracted with Ray Data on actors (GPU
    actors with ``use_gpu``), L2-normalised, and a linear classifier (logistic regression or a linear SVM,
    one-vs-rest for VOC's 20 binary problems) whose regularisation is chosen on the validation split.
``finetune``
    fc8 replaced by a new layer for the dataset's classes, the whole network trained with Ray Train: SGD with
    momentum, the pre-trained layers at a tenth of the new layer's learning rate, the paper's augmentation
    (random 224 crops, flips, PCA colour noise with the ImageNet statistics the checkpoint was trained with);
    binary cross-entropy for VOC's multi-hot labels (difficult labels ignored); centre-crop test predictions.

``run_transfer`` is the library function the CLI (``alexnet transfer``) and the Prefect flow's transfer stage
call; it logs one MLflow run per dataset and method, with the results next to the literature numbers. The parts:
``alexnet.protocols`` (index, splits, metrics), ``alexnet.features`` (backbone, features, linear probe) and
``alexnet.finetune`` (Ray Train fine-tuning); their names are re-exported here.

    alexnet transfer caltech101 --data runs/caltech101 --checkpoint runs/ray/alexnet/checkpoint_000089 --method probe
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from alexnet.config import TRANSFER_METHODS as METHODS
from alexnet.config import TransferConfig
from alexnet.features import (  # noqa: F401 - re-exported: alexnet.transfer is the import path of the whole API
    Backbone, FeatureExtractor, check_checkpoint, extract_features, feature_batches, fit_and_score, linear_probe,
    load_backbone, read_checkpoint_state)
from alexnet.finetune import (  # noqa: F401 - re-exported
    FINETUNE_CHECKPOINT, SCORES_FILE, finetune, finetune_loop_per_worker, finetune_optimizer, masked_bce, predict,
    replace_head)
from alexnet.protocols import (  # noqa: F401 - re-exported
    VOC07_RECALL_THRESHOLDS, DatasetIndex, ProtocolSplit, auc_ap, caltech_splits, chance_level, load_images,
    load_index, matlab_colon, mean_per_class_accuracy, per_image_scores, protocol_splits, score_predictions,
    voc07_ap, voc_gt)
from alexnet.results import TRANSFER_LITERATURE as LITERATURE
from alexnet.results import markdown, transfer_table
from pipelines.dataset import PreparedDataset

log = logging.getLogger(__name__)

#: MLflow artifact folder of every transfer run's per-image test scores (``per_image_scores``)
TEST_SCORES_DIR = "test_scores"


def summarise(dataset: str, method: str, per_split: list[dict[str, Any]], chance: float, **extra: Any
               ) -> dict[str, Any]:
    values = [r["value"] for r in per_split]
    result = {"dataset": dataset, "method": method, "metric": per_split[0]["metric"],
              "value": float(np.mean(values)), "std": float(np.std(values)) if len(values) > 1 else 0.0,
              "splits": len(values), "per_split": per_split, "chance": chance,
              "literature": LITERATURE[dataset], **extra}
    if "map_auc" in per_split[0]:
        result["map_auc"] = float(np.mean([r["map_auc"] for r in per_split]))
    return result


def run_transfer(dataset: str, data: str, checkpoint: str, *, method: str, config: TransferConfig,
                 imagenet_stats: str | None = None, ray_address: str | None = None, tracking: bool = True,
                 tracking_uri: str | None = None, experiment: str = "alexnet", parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the prepared transfer dataset ``data`` with ``method`` ("probe" or "finetune")
    under the dataset's standard protocol; log an MLflow run (a child of ``parent_run_id`` when given) with the
    results beside the literature. Returns the results."""
    from pipelines import storage
    from pipelines.rayutil import check_resources, ensure_ray

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    started = time.time()
    data = storage.absolute(data)
    if not storage.is_s3(checkpoint):
        checkpoint = storage.absolute(checkpoint)
    check_checkpoint(checkpoint)  # a missing, foreign or crafted checkpoint fails here, before any data or Ray
    prepared = PreparedDataset.open(data)  # read once; index, features and fine-tuning workers get this object
    index = load_index(prepared)
    if index.dataset != dataset:
        raise ValueError(f"{data} holds {index.dataset}, not {dataset}")
    splits = protocol_splits(index, config)
    ensure_ray(ray_address)
    if method == "finetune":
        check_resources("transfer", num_workers=config.num_workers, cpus_per_worker=config.cpus_per_worker,
                        use_gpu=config.use_gpu)
    test_rows = splits[0].test
    chance = chance_level(index, test_rows)
    identity = hashlib.sha256(json.dumps([checkpoint, prepared.manifest_sha256, asdict(config)],
                                         sort_keys=True).encode()).hexdigest()[:10]
    test_scores: dict[str, dict[str, np.ndarray]] = {}  # per evaluation: what the devkit needs to recompute it
    if method == "probe":
        features = extract_features(prepared, checkpoint, keys=index.keys, layers=list(config.probe_layers),
                                    batch_size=config.feature_batch_size, use_gpu=config.use_gpu,
                                    num_actors=config.feature_actors, imagenet_stats=imagenet_stats)
        layers = {}
        for layer in config.probe_layers:
            per_split = [{"split": s.name, **linear_probe(index, features[layer], s, config)} for s in splits]
            for s, r in zip(splits, per_split):
                test_scores[f"{layer}-{s.name}"] = per_image_scores(index, s.test, r.pop("scores"))
            layers[layer] = summarise(dataset, method, per_split, chance, layer=layer)
            log.info("%s probe %s: %s %.4f", dataset, layer, layers[layer]["metric"], layers[layer]["value"])
        result = {**layers[config.probe_layers[0]], "layers": layers}
    else:
        chosen = splits[: config.finetune_splits] if dataset == "caltech101" else splits
        per_split = [{"split": s.name, **finetune(index, prepared, checkpoint, s, config,
                                                   run_name=f"transfer-{dataset}-{s.name}-{identity}",
                                                   imagenet_stats=imagenet_stats)} for s in chosen]
        for s, r in zip(chosen, per_split):
            test_scores[f"finetune-{s.name}"] = per_image_scores(index, s.test, r.pop("scores"))
        result = summarise(dataset, method, per_split, chance, layer="all (fine-tuned)")
        log.info("%s finetune: %s %.4f", dataset, result["metric"], result["value"])
    result.update(checkpoint=checkpoint, data=data, data_manifest_sha256=prepared.manifest_sha256,
                  classes=index.num_classes,
                  images={s: int((index.splits == s).sum()) for s in np.unique(index.splits)},
                  elapsed_s=round(time.time() - started, 2), config=asdict(config))
    if tracking:
        result["mlflow_run_id"] = log_transfer(result, tracking_uri=tracking_uri, experiment=experiment,
                                               parent_run_id=parent_run_id, tags=tags, test_scores=test_scores)
    return result


def log_transfer(result: dict[str, Any], *, tracking_uri: str | None = None, experiment: str = "alexnet",
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 test_scores: dict[str, dict[str, np.ndarray]] | None = None) -> str:
    """One MLflow run ``transfer-<dataset>-<method>``: config, headline and per-split metrics, per-class numbers,
    the results table (json, md, MLflow table) beside the literature, and the per-image test scores of every
    evaluation (``test_scores/<name>.npz``, see ``per_image_scores``). Returns the run id."""
    from alexnet.tracking import RunLogger, git_commit, resolve_tracking_uri

    run = RunLogger(resolve_tracking_uri(tracking_uri), experiment,
                    run_name=f"transfer-{result['dataset']}-{result['method']}", parent_run_id=parent_run_id,
                    tags={"alexnet.stage": "transfer", "alexnet.transfer.dataset": result["dataset"],
                          "alexnet.transfer.method": result["method"], "transfer.checkpoint": result["checkpoint"],
                          "data_manifest_sha256": result["data_manifest_sha256"], "git_commit": git_commit(),
                          **(tags or {})})
    run.log_params({f"transfer.{k}": v for k, v in result["config"].items()}
                   | {"dataset": result["dataset"], "method": result["method"], "checkpoint": result["checkpoint"],
                      "data": result["data"]})
    metrics = {result["metric"]: result["value"], f"{result['metric']}_std": result["std"], "chance": result["chance"],
               "literature": result["literature"]["value"]}
    if "map_auc" in result:
        metrics["map_auc"] = result["map_auc"]
    for layer, lr in (result.get("layers") or {}).items():
        metrics[f"{layer}_{lr['metric']}"] = lr["value"]
    run.log_metrics(metrics, step=0)
    for i, split in enumerate(result["per_split"]):
        run.log_metrics({f"split_{result['metric']}": split["value"]}, step=i)
        for epoch in split.get("history", []):
            run.log_metrics({f"split{i}_{k}": v for k, v in epoch.items() if k != "epoch"}, step=int(epoch["epoch"]))
    table = transfer_table([result])
    run.log_dict({k: v for k, v in result.items() if k != "config"}, "transfer_results.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "transfer_results.md"
        path.write_text(markdown(table))
        run.log_file(path)
        for name, arrays in (test_scores or {}).items():
            np.savez(Path(tmp) / f"{name}.npz", **arrays)
            run.log_file(Path(tmp) / f"{name}.npz", TEST_SCORES_DIR)
    run.log_table(table, "transfer_table.json")
    run.end()
    return run.run_id


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The small, JSON-able part of a ``run_transfer`` result (what the flow keeps and the CLI prints last): the
    headline and per-layer numbers, per-split values, chance, the literature and where the result came from."""
    keep = ("dataset", "method", "layer", "metric", "value", "std", "splits", "chance", "map_auc", "literature",
            "checkpoint", "data", "data_manifest_sha256", "classes", "images", "elapsed_s", "mlflow_run_id")
    out = {k: result[k] for k in keep if k in result}
    out["split_values"] = [r["value"] for r in result["per_split"]]
    out["layers"] = {name: {k: v for k, v in r.items() if k not in ("per_split", "literature")}
                     for name, r in (result.get("layers") or {}).items()}
    return out
