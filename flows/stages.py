"""The heavy stages as JSON-in, JSON-out functions: what ``flows.ray_jobs.run_stage`` calls, in the flow's process
or in a Ray job (``python -m flows.job flows.stages:<name>``). Each builds the library's typed arguments from plain
values and calls exactly one library function (the one the CLI calls); none holds logic of its own.
"""

from __future__ import annotations

from typing import Any


def dataset_summary(manifest: dict[str, Any], data_uri: str, manifest_sha256: str) -> dict[str, Any]:
    """What the flow keeps of a prepared dataset's manifest."""
    return {
        "data_uri": data_uri,
        "manifest_sha256": manifest_sha256,
        "layout": manifest.get("source", {}).get("layout"),
        "num_classes": manifest["num_classes"],
        "splits": {s: {"rows": v["rows"], "rejected": v["rejected"], "shards": len(v["shards"])}
                   for s, v in manifest["splits"].items()},
        "rejects": [f"{r['key']}: {r['reason']}" for r in manifest.get("rejects", [])[:100]],
        "plan_hash": manifest.get("plan_hash"),
    }


def prepare(dataset: str, raw_uri: str, data_uri: str, *, image_format: str, quality: int, shard_rows: int | None,
            max_bad_fraction: float) -> dict[str, Any]:
    """``pipelines.prepare.prepare_dataset``: decode, resize, crop and shard ``raw_uri`` into ``data_uri``."""
    from pipelines import prepare as prep
    from pipelines.dataset import manifest_hash
    from pipelines.imaging import ImageRecipe

    manifest = prep.prepare_dataset(dataset, raw_uri, data_uri,
                                    recipe=ImageRecipe(image_format=image_format, quality=quality),
                                    shard_rows=shard_rows, max_bad_fraction=max_bad_fraction)
    return dataset_summary(manifest, data_uri, manifest_hash(data_uri))


def stats(data_uri: str) -> dict[str, Any]:
    """``pipelines.stats.compute_stats``: RGB mean/std, PCA and the mean image of the training split."""
    from pipelines.stats import compute_stats

    return compute_stats(data_uri)


def train(config: dict[str, Any], *, parent_run_id: str | None = None,
          tags: dict[str, str] | None = None) -> dict[str, Any]:
    """``alexnet.train.run_training`` with the resolved config (``Config.to_dict()``)."""
    from alexnet.config import Config
    from alexnet.train import run_training

    result = run_training(Config.from_dict(config), parent_run_id=parent_run_id, tags=tags)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"checkpoint": result.checkpoint, "mlflow_run_id": result.mlflow_run_id, "metrics": metrics,
            "epochs": metrics.get("epoch"), "history": result.history}


def evaluate(checkpoint: str, data_uri: str, *, crops: int, batch_size: int, limit: int | None) -> dict[str, Any]:
    """``alexnet.evaluate.evaluate_checkpoint``: top-1/top-5 error on the validation split."""
    from alexnet.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, data_uri, crops=crops, batch_size=batch_size, limit=limit)


def transfer(dataset: str, method: str, data_uri: str, checkpoint: str, *, config: dict[str, Any],
             imagenet_stats: str | None, tracking_uri: str, experiment: str, parent_run_id: str | None,
             tags: dict[str, str]) -> dict[str, Any]:
    """``alexnet.transfer.run_transfer`` with the preset's ``transfer`` section, summarised."""
    from alexnet.config import TransferConfig
    from alexnet.transfer import run_transfer, summarize

    return summarize(run_transfer(dataset, data_uri, checkpoint, method=method, config=TransferConfig(**config),
                                  imagenet_stats=imagenet_stats, tracking_uri=tracking_uri, experiment=experiment,
                                  parent_run_id=parent_run_id, tags=tags))
