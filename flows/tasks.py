"""The flow's Prefect tasks: one stage each, calling one library function through ``flows.ray_jobs.run_stage``
(here, or as a Ray job on the flow's cluster), with the stage's cache policy (``flows.caching``) and retries."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE

from alexnet.results import format_report
from flows.caching import EVALUATE_CACHE, PREPARE_CACHE, STATS_CACHE, TRAIN_CACHE, TRANSFER_CACHE
from flows.ray_jobs import RayJobError, run_stage


#: The config sections a training run depends on (the train stage's cache key and the training run's config).
TRAINING_SECTIONS = ("data", "model", "train", "tracking")


def prepare_options(config: dict[str, Any], *, max_bad_fraction: float | None = None) -> dict[str, Any]:
    """The prepare task's options from the resolved config's ``prepare`` section."""
    section = config["prepare"]
    return {"shard_rows": section["shard_rows"] or None, "image_format": section["image_format"],
            "quality": section["quality"],
            "max_bad_fraction": section["max_bad_fraction"] if max_bad_fraction is None else max_bad_fraction}


def worth_retrying(task, task_run, state) -> bool:
    """Retry I/O stages on transient errors only: not on bad input, checksum mismatches or a deterministic failure."""
    from pipelines.download import ChecksumError, DownloadError
    from pipelines.prepare import PrepareError

    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if isinstance(exc, RayJobError):
        return exc.transient
    if isinstance(exc, DownloadError):
        return exc.status is None or exc.status >= 500 or exc.status in (408, 429)
    deterministic = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError,
                     ChecksumError, PrepareError)
    return isinstance(exc, BaseException) and not isinstance(exc, deterministic)


def _refuse_foreign_files(raw_uri: str) -> Path:
    out = Path(raw_uri)
    if out.exists() and any(out.iterdir()) and not (out / "synth_info.json").exists():
        raise ValueError(f"refusing to write synthetic data into {raw_uri}: it holds other files "
                         "(synthetic=True is for smoke runs; pass an empty or new raw_uri)")
    return out


@task(name="synthesize", cache_policy=INPUTS, persist_result=True)
def synthesize(raw_uri: str, *, classes: int, train_per_class: int, val_per_class: int, size: int, seed: int,
               quirks: bool) -> dict[str, Any]:
    """A tiny ImageNet in the official formats, written into ``raw_uri`` (a local folder)."""
    from pipelines.synth import write_synthetic_imagenet

    info = write_synthetic_imagenet(_refuse_foreign_files(raw_uri), layout="official", classes=classes,
                                    train_per_class=train_per_class, val_per_class=val_per_class, size=size,
                                    seed=seed, quirks=quirks)
    return {"raw_uri": raw_uri, "classes": len(info.wnids), "train": len(info.train), "val": len(info.val)}


@task(name="synthesize-transfer", task_run_name="synthesize-{dataset}", cache_policy=INPUTS, persist_result=True)
def synthesize_transfer(dataset: str, raw_uri: str) -> dict[str, Any]:
    """``write_synthetic``: a small, learnable ``dataset`` (caltech101, flowers102, voc2007) in its official archive
    format, written into ``raw_uri`` (a local folder)."""
    from pipelines.synth import write_synthetic

    info = write_synthetic(dataset, _refuse_foreign_files(raw_uri))
    return {"raw_uri": raw_uri, "classes": len(info.classes), "images": {k: len(v) for k, v in info.splits.items()}}


@task(name="download", cache_policy=INPUTS, persist_result=True, retries=3, retry_delay_seconds=[10, 60, 300],
      retry_condition_fn=worth_retrying)
def download(source_uri: str, raw_uri: str, *, verify: bool, dataset: str = "imagenet") -> list[str]:
    """``download_dataset``: the official files of ``dataset`` from ``source_uri`` (https://, s3:// or a folder)
    into ``raw_uri``, checksums verified."""
    from pipelines.download import download_dataset

    return [str(p) for p in download_dataset(dataset, source_uri, raw_uri, verify=verify, progress=False)]


@task(name="prepare", cache_policy=PREPARE_CACHE, persist_result=True, retries=2, retry_delay_seconds=[30, 120],
      retry_condition_fn=worth_retrying)
def prepare(raw_uri: str, data_uri: str, *, shard_rows: int | None, max_bad_fraction: float,
            image_format: Literal["jpeg", "raw"], quality: int, ray_address: str | None,
            job_env: dict[str, str] | None = None, dataset: str = "imagenet") -> dict[str, Any]:
    """``prepare_dataset``: decode, resize, crop and shard ``raw_uri`` into ``data_uri`` with Ray Data."""
    return run_stage("flows.stages:prepare", dict(
        dataset=dataset, raw_uri=raw_uri, data_uri=data_uri, image_format=image_format, quality=quality,
        shard_rows=shard_rows, max_bad_fraction=max_bad_fraction), ray_address=ray_address, env=job_env,
        stage="prepare" if dataset == "imagenet" else f"prepare-{dataset}")


@task(name="stats", cache_policy=STATS_CACHE, persist_result=True)
def stats(data_uri: str, *, ray_address: str | None, job_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``compute_stats``: RGB mean/std, PCA and the mean image of the training split."""
    return run_stage("flows.stages:stats", {"data_uri": data_uri}, ray_address=ray_address, env=job_env,
                     stage="stats")


@task(name="train", cache_policy=TRAIN_CACHE, persist_result=True)
def train(config: dict[str, Any], data_uri: str, *, parent_run_id: str | None, tags: dict[str, str],
          ray_address: str | None, job_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``run_training`` with the resolved config; rerunning the same ``train.run_name`` resumes it. ``data_uri`` (the
    config's ``data.data``) keys the cache on the dataset's identity."""
    return run_stage("flows.stages:train", {"config": config, "parent_run_id": parent_run_id, "tags": tags},
                     ray_address=ray_address, env=job_env, stage="train")


@task(name="evaluate", task_run_name="evaluate-{crops}crop", cache_policy=EVALUATE_CACHE, persist_result=True)
def evaluate(checkpoint: str, data_uri: str, *, crops: int, batch_size: int, limit: int | None,
             ray_address: str | None, job_env: dict[str, str] | None = None, gpus: float = 0) -> dict[str, Any]:
    """``evaluate_checkpoint``: top-1/top-5 error on the validation split, centre crop or 10 crops."""
    if ray_address:
        from pipelines.rayutil import check_resources

        # the job asks for a GPU when training used them (train.use_gpu): say so if the cluster has none free
        check_resources("train", num_workers=1, cpus_per_worker=1, use_gpu=bool(gpus), address=ray_address)
    return run_stage("flows.stages:evaluate", dict(checkpoint=checkpoint, data_uri=data_uri, crops=crops,
                                                   batch_size=batch_size, limit=limit),
                     ray_address=ray_address, env=job_env, stage=f"evaluate-{crops}crop", cpus=1, gpus=gpus)


@task(name="transfer", task_run_name="transfer-{dataset}-{method}", cache_policy=TRANSFER_CACHE, persist_result=True)
def transfer(dataset: str, method: str, data_uri: str, checkpoint: str, *, config: dict[str, Any],
             imagenet_stats: str | None, tracking_uri: str, experiment: str, parent_run_id: str | None,
             tags: dict[str, str], ray_address: str | None, job_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``run_transfer``: probe or fine-tune ``checkpoint`` on ``dataset`` under the dataset's standard protocol."""
    return run_stage("flows.stages:transfer", dict(
        dataset=dataset, method=method, data_uri=data_uri, checkpoint=checkpoint, config=config,
        imagenet_stats=imagenet_stats, tracking_uri=tracking_uri, experiment=experiment, parent_run_id=parent_run_id,
        tags=tags), ray_address=ray_address, env=job_env, stage=f"transfer-{dataset}-{method}")


@task(name="register", cache_policy=NO_CACHE)
def register(tracking_uri: str, model_name: str, training_run_id: str, alias: str,
             evaluation: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """``promote_model``: tag the model version the training run registered; move ``alias`` to it when it is better."""
    from alexnet.registry import promote_model

    return promote_model(tracking_uri, model_name, training_run_id, alias, evaluation, tags)


@task(name="report", cache_policy=NO_CACHE)
def report(summary: dict[str, Any]) -> str:
    """Print and return the short summary."""
    text = format_report(summary)
    print(text)
    return text
