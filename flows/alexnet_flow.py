"""The Prefect flow ``alexnet``: the whole reproduction as one resumable, tracked run.

Stages, each a task calling exactly one library function (the same one the CLI calls)::

    [synthesize]  pipelines.synth.write_synthetic_imagenet   only with synthetic=True (smoke runs)
    [download]    pipelines.download.download_imagenet        only when source_uri is given
    prepare       pipelines.prepare.prepare_imagenet          Ray Data -> Parquet shards + manifest.json
    stats         pipelines.stats.compute_stats               stats.json + mean_image.npy
    train         alexnet.train.run_training                  Ray Train, MLflow training run from rank 0
    evaluate      alexnet.evaluate.evaluate_checkpoint        centre crop and the paper's 10 crops
    [post-training stages]  POST_TRAINING_STAGES, in the order of ``post_training``:
      register    promote_model                               MLflow registry alias for the best model
      transfer    per dataset of the preset's ``transfer`` section (Caltech-101, Flowers-102, VOC 2007):
                  [synthesize|download] + prepare (prepare_dataset), then per method
                  alexnet.transfer.run_transfer               linear probe (Ray Data actors) / fine-tuning (Ray Train)
    report        format_report                               the short summary (printed and returned)

With ``checkpoint`` the ImageNet stages are skipped and the post-training stages transfer from that checkpoint
(deployment ``alexnet/transfer``).

**Resume.** Every stage task persists its (small, plain) result and is cached on its inputs plus what it reads:
``prepare`` on a listing of ``raw_uri`` (paths, sizes, modification times), ``stats``/``train``/``evaluate`` on
the prepared dataset's identity (sha256 of ``manifest.json``; the mean image's sha256), so a changed dataset
invalidates everything downstream. Rerunning a failed or interrupted flow with the same parameters therefore skips
the completed stages (their task runs end ``Cached``); ``refresh=["stats", ...]`` (or ``["all"]``) recomputes
stages on purpose, and a stage whose output has disappeared (no ``manifest.json``, no ``stats.json``, missing
downloads) is recomputed automatically. Results live in ``results_dir`` (default: Prefect's
``PREFECT_LOCAL_STORAGE_PATH``). The library functions are themselves idempotent and resumable (prepare resumes
its shards, training resumes from the latest checkpoint of ``train.run_name``), so the cache is an optimisation
that also lets a rerun skip training. I/O stages (download, prepare) retry with backoff on transient errors.
A failing stage fails the flow with ``stage '<name>' failed: <cause>``.

**Lineage.** One MLflow parent run per flow run, in the preset's ``tracking.experiment``, tagged with the Prefect
flow run id, the git commit, the data manifest sha256 and the stats sha256; one child run per stage
(``mlflow.parentRunId``), the training run being the train stage's child. The evaluate stage logs the results table
(centre crop and 10 crops next to the paper's 1-CNN numbers) as ``results.json``, ``results.md``, ``results.csv``
and an MLflow table, and its errors as metrics of the parent.

**Where the heavy stages run.** Without a Ray address (or with ``local``, Ray's name for it), in this process on a
local Ray (as ``make smoke``). With ``ray_address`` (or ``RAY_ADDRESS``) prepare, stats, train, evaluate and
transfer are submitted to that cluster as
**Ray jobs** running the CLI (``python -m alexnet.cli prepare imagenet ...``, ``python -m alexnet.train ...``) with
the repository as ``working_dir``; their logs stream into the task's log and a failed or stopped job fails the stage
with the tail of its logs. The address may be the dashboard (``http://head:8265``), the GCS (``head:6379``) or a
Ray Client address. Ray 2.60 clusters started with ``ray start --head`` require token authentication: the process
running the flow needs ``RAY_AUTH_MODE=token`` and the cluster's token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token``; ``ray get-auth-token`` prints it). Local paths are made absolute before submission, so
they must be visible on the cluster (one machine or a shared file system; use ``s3://`` otherwise), and so must the
MLflow store (``MLFLOW_TRACKING_URI``, passed to every job). The jobs run ``python`` from the cluster's ``PATH``
(``ALEXNET_RAY_JOB_PYTHON`` overrides it). Synthesis, download and the MLflow bookkeeping always run in the flow's
process; nothing here imports torch, so a Prefect worker can stay small.

Run it::

    python -m alexnet.smoke                                        # make smoke: synthetic data, local everything
    prefect deploy --all && prefect deployment run alexnet/smoke   # prefect.yaml: smoke and full-reproduction
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, CachePolicy
from pydantic import BaseModel, Field

from alexnet.results import PAPER_VAL_ERRORS, csv_text, imagenet_table, markdown
from pipelines.redact import has_secret, redact_handlers, redact_text, redact_uri
from pipelines.rayutil import cluster_address

REPO_ROOT = Path(__file__).resolve().parents[1]


#: Left out of the Ray jobs' ``working_dir`` on top of ``.gitignore`` (which Ray applies itself).
RAY_JOB_EXCLUDES = [".git", ".venv", "runs", "mlruns", "mlflow.db", "data", ".bench", "test-artifacts", ".pytest_cache",
                    "__pycache__"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its log prefixes


class StageFailed(RuntimeError):
    """A stage of the flow failed; the message names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        text = redact_text(str(cause).strip() or repr(cause))
        if len(text) > 4000:  # a Ray Train failure carries every worker's traceback: keep both ends
            text = text[:1500] + "\n...\n" + text[-2500:]
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {text}")
        self.stage = stage


class RayJobError(RuntimeError):
    """A Ray job of a stage ended FAILED or STOPPED; the message holds the job's message and the tail of its logs."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class SyntheticImageNet(BaseModel):
    """The tiny ImageNet written into ``raw_uri`` when ``synthetic=True`` (``alexnet synth imagenet``)."""

    classes: int = Field(10, ge=3, description="classes (at least 3: the quirky files belong to real wnids)")
    train_per_class: int = Field(40, ge=1)
    val_per_class: int = Field(10, ge=1)
    size: int = Field(320, ge=32, description="typical longer side of an image, pixels")
    seed: int = 0
    quirks: bool = True


# --- cache keys ------------------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(kw_only=True)
class UriListing(CachePolicy):
    """Key part: every file below the URI in the task input ``parameter`` (path, size, modification time), so a
    changed source invalidates the stage. One listing: milliseconds for the official files, longer for millions
    of loose files (ImageFolder layout)."""

    parameter: str = "raw_uri"

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        import pyarrow.fs as pafs

        from pipelines import storage

        fs, root = storage.filesystem(inputs[self.parameter])
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
        return _sha256(json.dumps(listing).encode())


@dataclass(kw_only=True)
class DatasetVersion(CachePolicy):
    """Key part: the identity of the prepared dataset at the URI in the task input ``parameter``: the sha256 of its
    ``manifest.json`` and, with ``stats``, the sha256 of its mean image. Read when the task is about to run, so a
    dataset prepared again (or elsewhere) invalidates every stage that read it, even when ``prepare`` was cached."""

    parameter: str = "data_uri"
    stats: bool = False

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        from pipelines import prepare, storage
        from pipelines import stats as stats_mod

        data = inputs[self.parameter]
        manifest_uri = storage.join(data, prepare.MANIFEST)
        stats_uri = storage.join(data, stats_mod.STATS)
        if not storage.exists(manifest_uri) or (self.stats and not storage.exists(stats_uri)):
            return f"incomplete-{uuid.uuid4().hex}"  # never a hit: the stage will report what is missing
        parts = [_sha256(storage.read_bytes(manifest_uri))]
        if self.stats:
            parts.append(storage.read_json(stats_uri).get("mean_image_sha256", ""))
        return _sha256("/".join(parts).encode())


def _inputs_except(*names: str) -> CachePolicy:
    policy = INPUTS
    for name in names:
        policy = policy - name
    return policy


#: Where a stage runs does not change its result; neither does the MLflow lineage of the flow run calling it.
_NOT_KEYED = ("ray_address", "job_env")
PREPARE_CACHE = _inputs_except(*_NOT_KEYED) + UriListing(parameter="raw_uri")
STATS_CACHE = _inputs_except(*_NOT_KEYED) + DatasetVersion(parameter="data_uri")
TRAIN_CACHE = _inputs_except(*_NOT_KEYED, "parent_run_id", "tags") + DatasetVersion(parameter="data_uri", stats=True)
EVALUATE_CACHE = _inputs_except(*_NOT_KEYED) + DatasetVersion(parameter="data_uri", stats=True)


# --- Ray jobs --------------------------------------------------------------------------------------------------------


def _job_client(address: str):
    """A ``JobSubmissionClient`` for ``address`` (dashboard URL, GCS address or ray://). Ray lets ``RAY_ADDRESS``
    override an explicit address; here the explicit one wins. Token auth comes from ``RAY_AUTH_MODE=token`` and
    ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``."""
    from ray.job_submission import JobSubmissionClient

    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address)
    finally:
        os.environ.update(saved)


def _job_env(tracking_uri: str | None) -> dict[str, str]:
    """What a job needs from the flow's environment: the MLflow store and where S3 is. Credentials are not copied
    (job settings are visible in the Ray dashboard): give the cluster its own (instance role or its environment)."""
    from pipelines import storage

    env = {"PYTHONUNBUFFERED": "1"} | storage.worker_env().get("env_vars", {})
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def refuse_secrets_in_jobs(named: dict[str, str]) -> None:
    """Refuse to put a credential-bearing value (``named``: what it is -> the value) into a Ray job: its entrypoint
    and runtime_env are shown by the dashboard, ``ray job list`` and the job's logs. The error names the values,
    redacted, and the way out: credentials by the cluster's own means."""
    exposed = [f"{name} ({redact_text(value)})" for name, value in named.items() if has_secret(str(value))]
    if exposed:
        raise ValueError(
            f"refusing to send credentials to Ray jobs, whose command line and environment the cluster shows: "
            f"{', '.join(exposed)} carry a password, token or signature. Give the cluster's nodes their own "
            "(MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD for an MLflow server, PGPASSWORD or ~/.pgpass for "
            "PostgreSQL, an instance role or AWS_* variables for S3) and pass the URIs without them")


def _logger():
    """The task's Prefect logger; a plain one outside a run (a job run by hand)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(__name__)


def run_ray_job(address: str, stage: str, argv: list[str], *, env: dict[str, str] | None = None,
                entrypoint_num_cpus: float = 0, entrypoint_num_gpus: float = 0, poll_s: float = 2.0) -> str:
    """Run ``python ARGV...`` as a Ray job on the cluster at ``address`` with the repository as its working dir;
    stream its logs into the task's log; return the full logs, or raise :class:`RayJobError` with their tail.
    Interrupting this (a cancelled flow run) stops the job."""
    from ray.job_submission import JobStatus

    refuse_secrets_in_jobs({f"argument {i + 1}": a for i, a in enumerate(argv)} | {f"env {k}": v
                                                                                  for k, v in (env or {}).items()})
    logger = _logger()
    client = _job_client(address)
    python = os.environ.get("ALEXNET_RAY_JOB_PYTHON", "python")
    entrypoint = shlex.join([python, *argv])
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"alexnet-{stage}-{uuid.uuid4().hex[:12]}",
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": RAY_JOB_EXCLUDES, "env_vars": env or {}},
        metadata={"alexnet_stage": stage, "prefect_flow_run_id": _flow_run_id() or ""},
        entrypoint_num_cpus=entrypoint_num_cpus or None,
        entrypoint_num_gpus=entrypoint_num_gpus or None,
    )
    logger.info("%s: submitted Ray job %s to %s: %s", stage, job_id, address, entrypoint)
    shown = 0
    started = time.monotonic()

    def relay(final: bool = False) -> str:
        nonlocal shown
        logs = client.get_job_logs(job_id)
        chunk = logs[shown:]
        if not final:  # whole lines only: the last one may still be being written
            chunk = chunk[: chunk.rfind("\n") + 1]
        shown += len(chunk)
        for line in _ANSI.sub("", chunk).splitlines():
            logger.info("[%s] %s", job_id, redact_text(line))
        return logs

    try:
        while True:
            status = client.get_job_status(job_id)
            if status.is_terminal():
                break
            relay()
            # every 2 s at first, then less often for long jobs (each poll fetches the whole log)
            time.sleep(poll_s if time.monotonic() - started < 120 else max(poll_s, 15.0))
    except BaseException:
        logger.warning("%s: stopping Ray job %s", stage, job_id)
        try:
            client.stop_job(job_id)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    logs = relay(final=True)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        exit_code = getattr(info, "driver_exit_code", None)
        last = redact_text("\n".join(_ANSI.sub("", logs).splitlines()[-40:]))
        raise RayJobError(f"Ray job {job_id} ({entrypoint}) ended {status.value}: {info.message or ''}\n"
                          f"last lines of its logs:\n{last}",
                          transient=status == JobStatus.FAILED and exit_code is None)
    logger.info("%s: Ray job %s succeeded in %.0f s", stage, job_id, time.monotonic() - started)
    return logs


def last_json_block(logs: str) -> dict[str, Any]:
    """The last top-level JSON object printed with ``json.dumps(..., indent=2)`` in ``logs`` (the CLI's result)."""
    lines = logs.splitlines()
    for end in range(len(lines) - 1, -1, -1):
        if lines[end].rstrip() != "}":
            continue
        for start in range(end, -1, -1):
            if lines[start].rstrip() == "{":
                try:
                    return json.loads("\n".join(lines[start : end + 1]))
                except json.JSONDecodeError:
                    break
    raise ValueError("no JSON result found in the job's output")


# --- tasks: one library function each ---------------------------------------------------------------------------------


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


def _worth_retrying(task, task_run, state) -> bool:
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


@task(name="synthesize", cache_policy=INPUTS, persist_result=True)
def synthesize(raw_uri: str, *, classes: int, train_per_class: int, val_per_class: int, size: int, seed: int,
               quirks: bool) -> dict[str, Any]:
    """A tiny ImageNet in the official formats, written into ``raw_uri`` (a local folder)."""
    from pipelines.synth import write_synthetic_imagenet

    out = Path(raw_uri)
    if out.exists() and any(out.iterdir()) and not (out / "synth_info.json").exists():
        raise ValueError(f"refusing to write synthetic data into {raw_uri}: it holds other files "
                         "(synthetic=True is for smoke runs; pass an empty or new raw_uri)")
    info = write_synthetic_imagenet(out, layout="official", classes=classes, train_per_class=train_per_class,
                                    val_per_class=val_per_class, size=size, seed=seed, quirks=quirks)
    return {"raw_uri": raw_uri, "classes": len(info.wnids), "train": len(info.train), "val": len(info.val)}


@task(name="synthesize-transfer", task_run_name="synthesize-{dataset}", cache_policy=INPUTS, persist_result=True)
def synthesize_transfer(dataset: str, raw_uri: str) -> dict[str, Any]:
    """``write_synthetic``: a small, learnable ``dataset`` (caltech101, flowers102, voc2007) in its official archive
    format, written into ``raw_uri`` (a local folder)."""
    from pipelines.synth import write_synthetic

    out = Path(raw_uri)
    if out.exists() and any(out.iterdir()) and not (out / "synth_info.json").exists():
        raise ValueError(f"refusing to write synthetic data into {raw_uri}: it holds other files")
    info = write_synthetic(dataset, out)
    return {"raw_uri": raw_uri, "classes": len(info.classes), "images": {k: len(v) for k, v in info.splits.items()}}


@task(name="download", cache_policy=INPUTS, persist_result=True, retries=3, retry_delay_seconds=[10, 60, 300],
      retry_condition_fn=_worth_retrying)
def download(source_uri: str, raw_uri: str, *, verify: bool, dataset: str = "imagenet") -> list[str]:
    """``download_dataset``: the official files of ``dataset`` from ``source_uri`` (https://, s3:// or a folder)
    into ``raw_uri``, checksums verified."""
    from pipelines.download import download_dataset

    return [str(p) for p in download_dataset(dataset, source_uri, raw_uri, verify=verify, progress=False)]


def _dataset_summary(manifest: dict[str, Any], data_uri: str, manifest_sha256: str) -> dict[str, Any]:
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


@task(name="prepare", cache_policy=PREPARE_CACHE, persist_result=True, retries=2, retry_delay_seconds=[30, 120],
      retry_condition_fn=_worth_retrying)
def prepare(raw_uri: str, data_uri: str, *, shard_rows: int | None, max_bad_fraction: float,
            image_format: Literal["jpeg", "raw"], quality: int, ray_address: str | None,
            job_env: dict[str, str] | None = None, dataset: str = "imagenet") -> dict[str, Any]:
    """``prepare_dataset``: decode, resize, crop and shard ``raw_uri`` into ``data_uri`` with Ray Data."""
    from pipelines import prepare as prep
    from pipelines import storage

    if ray_address:
        argv = ["-m", "alexnet.cli", "prepare", dataset, "--source", raw_uri, "--out", data_uri,
                "--max-bad-fraction", str(max_bad_fraction), "--format", image_format, "--quality", str(quality)]
        run_ray_job(ray_address, "prepare" if dataset == "imagenet" else f"prepare-{dataset}",
                    argv + (["--shard-rows", str(shard_rows)] if shard_rows else []), env=job_env)
        manifest = prep.load_manifest(data_uri)
    else:
        from pipelines.imaging import ImageRecipe

        manifest = prep.prepare_dataset(dataset, raw_uri, data_uri,
                                        recipe=ImageRecipe(image_format=image_format, quality=quality),
                                        shard_rows=shard_rows, max_bad_fraction=max_bad_fraction)
    return _dataset_summary(manifest, data_uri, _sha256(storage.read_bytes(storage.join(data_uri, prep.MANIFEST))))


@task(name="stats", cache_policy=STATS_CACHE, persist_result=True)
def stats(data_uri: str, *, ray_address: str | None, job_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``compute_stats``: RGB mean/std, PCA and the mean image of the training split."""
    from pipelines import storage
    from pipelines import stats as stats_mod

    if ray_address:
        run_ray_job(ray_address, "stats", ["-m", "alexnet.cli", "stats", "--data", data_uri], env=job_env)
        return storage.read_json(storage.join(data_uri, stats_mod.STATS))
    return stats_mod.compute_stats(data_uri)


def _config_argv(config: dict[str, Any]) -> list[str]:
    """``--set section.key=value`` for every key of a resolved config: the job trains with exactly it."""
    argv = []
    for section, values in config.items():
        for key, value in values.items():
            text = json.dumps(value) if isinstance(value, list) else str(value)
            argv += ["--set", f"{section}.{key}={text}"]
    return argv


@task(name="train", cache_policy=TRAIN_CACHE, persist_result=True)
def train(config: dict[str, Any], data_uri: str, *, parent_run_id: str | None, tags: dict[str, str],
          ray_address: str | None, job_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``run_training`` with the resolved config; rerunning the same ``train.run_name`` resumes it."""
    if ray_address:
        logs = run_ray_job(ray_address, "train", ["-m", "alexnet.train", *_config_argv(config)], env=job_env)
        out = last_json_block(logs)
        return {"checkpoint": out["checkpoint"], "mlflow_run_id": out.get("mlflow_run_id"),
                "metrics": out.get("metrics", {}), "epochs": out.get("metrics", {}).get("epoch")}
    from alexnet.config import Config
    from alexnet.train import run_training

    result = run_training(Config.from_dict(config), parent_run_id=parent_run_id, tags=tags)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"checkpoint": result.checkpoint, "mlflow_run_id": result.mlflow_run_id, "metrics": metrics,
            "epochs": metrics.get("epoch"), "history": result.history}


@task(name="evaluate", task_run_name="evaluate-{crops}crop",
      cache_policy=EVALUATE_CACHE, persist_result=True)
def evaluate(checkpoint: str, data_uri: str, *, crops: int, batch_size: int, limit: int | None,
             ray_address: str | None, job_env: dict[str, str] | None = None, gpus: float = 0) -> dict[str, Any]:
    """``evaluate_checkpoint``: top-1/top-5 error on the validation split, centre crop or 10 crops."""
    if ray_address:
        from pipelines.rayutil import check_resources

        # the job asks for a GPU when training used them (train.use_gpu): say so if the cluster has none free
        check_resources("train", num_workers=1, cpus_per_worker=1, use_gpu=bool(gpus), address=ray_address)
        argv = ["-m", "alexnet.cli", "evaluate", "--checkpoint", checkpoint, "--data", data_uri,
                "--crops", str(crops), "--batch-size", str(batch_size), "--no-tracking"]
        logs = run_ray_job(ray_address, f"evaluate-{crops}crop", argv + (["--limit", str(limit)] if limit else []),
                           env=job_env, entrypoint_num_cpus=1, entrypoint_num_gpus=gpus)
        return last_json_block(logs)
    from alexnet.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, data_uri, crops=crops, batch_size=batch_size, limit=limit)


def format_report(summary: dict[str, Any]) -> str:
    """The short, human summary of a flow run."""
    lines = [f"alexnet flow run {summary['prefect'].get('flow_run_name')} ({summary['prefect'].get('flow_run_id')})"]
    for name, s in summary["stages"].items():
        lines.append(f"  {name:<29} {s['state']:<9} {s['seconds']:8.1f} s")
    if "splits" in summary:  # the ImageNet stages ran (not a transfer-only run from a given checkpoint)
        splits = ", ".join(f"{k} {v['rows']} rows ({v['rejected']} rejected)" for k, v in summary["splits"].items())
        lines.append(f"data: {summary['data']}: {splits}")
        lines.append(f"train: {summary['train'].get('epochs')} epochs, checkpoint {summary['train'].get('checkpoint')}")
        for name, err in summary.get("val_error", {}).items():
            lines.append(f"val error, {name}: top-1 {100 * err['top1']:.1f}%, top-5 {100 * err['top5']:.1f}%")
        paper = summary["paper_val_error"]["10 crops"]
        lines.append(f"paper, 1 CNN, 10 crops (ImageNet): top-1 {100 * paper['top1']:.1f}%, "
                     f"top-5 {100 * paper['top5']:.1f}%; chance here: {100 * summary['chance_top1_error']:.1f}%")
    else:
        lines.append(f"checkpoint: {summary.get('checkpoint')}")
    table = summary.get("transfer")
    for i in range(len((table or {}).get("dataset", []))):
        lines.append(f"transfer {table['dataset'][i]:<10} {table['method'][i]:<8} {table['layer'][i]:<16} "
                     f"{table['metric'][i]} {table['this_run_pct'][i]:.1f}% (+-{table['std_pct'][i]:.1f}; "
                     f"literature {table['literature_pct'][i]:.1f}%, chance {table['chance_pct'][i]:.1f}%)")
    if summary.get("registered_model"):
        m = summary["registered_model"]
        lines.append(f"model: {m['name']} version {m['version']}" + (f" (@{m['alias']})" if m.get("alias") else ""))
    ml = summary["mlflow"]
    lines.append(f"MLflow: parent run {ml['parent_run_id']}, training run {ml['run_id'] or '-'} in experiment "
                 f"{ml['experiment']!r} at {ml['tracking_uri']}")
    lines.append(f"open the UI: {ml['ui']}")
    return "\n".join(lines)


@task(name="report", cache_policy=NO_CACHE)
def report(summary: dict[str, Any]) -> str:
    """Print and return the short summary."""
    text = format_report(summary)
    print(text)
    return text


# --- MLflow lineage ---------------------------------------------------------------------------------------------------


class Lineage:
    """The MLflow side of one flow run: a parent run and a child run per stage (through ``alexnet.tracking``)."""

    def __init__(self, tracking_uri: str, experiment: str, *, run_name: str, tags: dict[str, str]) -> None:
        from alexnet.tracking import RunLogger

        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.parent = RunLogger(tracking_uri, experiment, run_name=run_name, tags=tags)
        self.run_id = self.parent.run_id

    def child(self, stage: str, tags: dict[str, str] | None = None):
        from alexnet.tracking import RunLogger

        return RunLogger(self.tracking_uri, self.experiment, run_name=stage, parent_run_id=self.run_id,
                         tags={"alexnet.stage": stage, **(tags or {})})

    def client(self):
        import mlflow

        return mlflow.MlflowClient(self.tracking_uri)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client().log_text(run_id, redact_text(text), name)


# --- post-training stages ---------------------------------------------------------------------------------------------


@dataclass
class PipelineState:
    """What the stages after training see (and a transfer-learning stage will need): resolved config, data,
    checkpoint, evaluations, lineage and the flow's parameters."""

    config: dict[str, Any]
    data_uri: str
    checkpoint: str | None
    training_run_id: str | None
    evaluations: dict[int, dict[str, Any]]
    lineage: Lineage
    ray_address: str | None
    job_env: dict[str, str]
    parameters: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)  #: each post-training stage's result, by name
    #: ``task_with(task, stage, missing)``: the task with the flow's result storage and refresh options
    task_with: Callable[..., Any] = lambda t, stage, missing=False: t


@task(name="register", cache_policy=NO_CACHE)
def register(tracking_uri: str, model_name: str, training_run_id: str, alias: str,
             evaluation: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """``promote_model``: tag the model version the training run registered; move ``alias`` to it when it is better."""
    return promote_model(tracking_uri, model_name, training_run_id, alias, evaluation, tags)


def promote_model(tracking_uri: str, model_name: str, training_run_id: str, alias: str,
                  evaluation: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """Find the version of ``model_name`` logged by ``training_run_id``, tag it with its evaluation and lineage, and
    point ``alias`` at it unless the current holder, evaluated on the same dataset, has a lower top-1 error."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    versions = client.search_model_versions(f"name='{model_name}' and run_id='{training_run_id}'")
    if not versions:
        raise ValueError(f"the training run {training_run_id} registered no version of {model_name!r} "
                         "(tracking.log_model must be true)")
    version = max(versions, key=lambda v: int(v.version))
    err = evaluation["top1_err"]
    manifest = evaluation.get("data_manifest_sha256") or ""
    for k, v in {**tags, "val_top1_err": f"{err:.6f}", "val_top5_err": f"{evaluation['top5_err']:.6f}",
                 "eval_crops": str(evaluation["crops"]), "data_manifest_sha256": manifest}.items():
        client.set_model_version_tag(model_name, version.version, k, v)
    move, reason = True, "no current holder"
    try:
        holder = client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        holder = None
    if holder is not None and holder.version == version.version:
        reason = "already holds it"
    elif holder is not None:
        same_data = holder.tags.get("data_manifest_sha256") == manifest
        held_err = float(holder.tags.get("val_top1_err", "inf"))
        move = not same_data or err <= held_err
        reason = (f"version {holder.version} has top-1 error {held_err:.4f}" if same_data
                  else f"version {holder.version} was evaluated on other data")
    if move:
        client.set_registered_model_alias(model_name, alias, version.version)
    return {"name": model_name, "version": version.version, "alias": alias if move else None,
            "alias_reason": reason, "top1_err": err}


def register_stage(state: PipelineState, stages: _Stages) -> dict[str, Any] | None:
    """Post-training stage "register": the registry step of ``tracking.registered_model`` (skipped when unset)."""
    name = state.config["tracking"]["registered_model"]
    if not name or not state.config["tracking"]["log_model"] or not state.training_run_id:
        return None
    best = state.evaluations[max(state.evaluations)]  # the most crops: the paper's protocol
    (result,) = stages.run("register", lambda: register(
        state.lineage.tracking_uri, name, state.training_run_id, state.parameters["model_alias"], best,
        {"prefect.flow_run_id": _flow_run_id() or "", "mlflow.parent_run_id": state.lineage.run_id},
        return_state=True))
    return result


class TransferData(BaseModel):
    """Where the transfer stage finds each dataset's official archives and where its prepared copy goes."""

    raw_root: str = Field("runs/smoke/transfer-raw",
                          description="<raw_root>/<dataset>/ holds the dataset's official archives (folder or s3://)")
    data_root: str = Field("runs/smoke/transfer", description="<data_root>/<dataset>/ receives the prepared dataset")
    source_uri: str | None = Field(None, description="download the archives from <source_uri>/<dataset>/ first "
                                   "(https://, s3:// or a folder), MD5s verified")
    synthetic: bool | None = Field(None, description="write small synthetic datasets into raw_root first; "
                                   "default: as the flow's `synthetic`")
    max_bad_fraction: float = 0.01
    imagenet_stats: str | None = Field(None, description="prepared ImageNet holding the stats.json the checkpoint was "
                                       "trained with; default: the one named in the checkpoint's config (the flow's "
                                       "data_uri for a checkpoint it trained)")


#: Not part of a transfer result's identity: where it runs and the MLflow lineage of the flow run calling it.
TRANSFER_CACHE = _inputs_except(*_NOT_KEYED, "parent_run_id", "tags") + DatasetVersion(parameter="data_uri")


@task(name="transfer", task_run_name="transfer-{dataset}-{method}", cache_policy=TRANSFER_CACHE, persist_result=True)
def transfer(dataset: str, method: str, data_uri: str, checkpoint: str, *, config: dict[str, Any],
             imagenet_stats: str | None, tracking_uri: str, experiment: str, parent_run_id: str | None,
             tags: dict[str, str], ray_address: str | None, job_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``run_transfer``: probe or fine-tune ``checkpoint`` on ``dataset`` under the dataset's standard protocol."""
    if ray_address:
        argv = ["-m", "alexnet.cli", "transfer", dataset, "--data", data_uri, "--checkpoint", checkpoint,
                "--method", method, "--tracking-uri", tracking_uri, "--experiment", experiment,
                *_config_argv({"transfer": config})]
        logs = run_ray_job(ray_address, f"transfer-{dataset}-{method}",
                           argv + (["--imagenet-stats", imagenet_stats] if imagenet_stats else []), env=job_env)
        result = last_json_block(logs)
        if result.get("mlflow_run_id") and parent_run_id:  # the job's run joins this flow run's lineage
            import mlflow

            client = mlflow.MlflowClient(tracking_uri)
            for k, v in {**tags, "mlflow.parentRunId": parent_run_id}.items():
                client.set_tag(result["mlflow_run_id"], k, v)
        return result
    from alexnet.config import TransferConfig
    from alexnet.transfer import run_transfer, summarize

    return summarize(run_transfer(dataset, data_uri, checkpoint, method=method, config=TransferConfig(**config),
                                  imagenet_stats=imagenet_stats, tracking_uri=tracking_uri, experiment=experiment,
                                  parent_run_id=parent_run_id, tags=tags))


def transfer_stage(state: PipelineState, stages: _Stages) -> dict[str, Any] | None:
    """Post-training stage "transfer": for each dataset of the preset's ``transfer`` section, its data (synthesise or
    download, then prepare: stage ``transfer-<dataset>-data``) and each method (stage ``transfer-<dataset>-<method>``,
    whose MLflow run ``run_transfer`` makes under the parent run); then the table of all of them, beside the
    literature, on the parent run."""
    from alexnet.results import transfer_table
    from pipelines import storage

    if not state.checkpoint:
        return None
    cfg = state.config["transfer"]
    spec = TransferData.model_validate(state.parameters.get("transfer_data") or {})
    synthetic = spec.synthetic if spec.synthetic is not None else bool(state.parameters.get("synthetic"))
    image_format = state.parameters.get("image_format", "jpeg")
    quality = state.parameters.get("quality", 90)
    results = []
    for dataset in cfg["datasets"]:
        raw = storage.absolute(storage.join(spec.raw_root, dataset))
        data = storage.absolute(storage.join(spec.data_root, dataset))
        calls = []
        if synthetic:
            calls.append(lambda raw=raw, dataset=dataset: state.task_with(
                synthesize_transfer, "synthesize", not storage.exists(storage.join(raw, "synth_info.json")))(
                    dataset, raw, return_state=True))
        elif spec.source_uri:
            calls.append(lambda raw=raw, dataset=dataset: state.task_with(download, "download")(
                storage.join(spec.source_uri, dataset), raw, verify=state.parameters.get("download_verify", True),
                dataset=dataset, return_state=True))
        calls.append(lambda raw=raw, data=data, dataset=dataset: state.task_with(
            prepare, "prepare", not storage.exists(storage.join(data, "manifest.json")))(
                raw, data, shard_rows=None, max_bad_fraction=spec.max_bad_fraction, image_format=image_format,
                quality=quality, ray_address=state.ray_address, job_env=state.job_env, dataset=dataset,
                return_state=True))
        stages.run(f"transfer-{dataset}-data", *calls, log=lambda run, r: run.log_dict(r[-1], "dataset.json"))
        for method in cfg["methods"]:
            def run(data=data, dataset=dataset, method=method):
                return state.task_with(transfer, "transfer")(
                    dataset, method, data, state.checkpoint, config=cfg,
                    imagenet_stats=spec.imagenet_stats,
                    tracking_uri=state.lineage.tracking_uri, experiment=state.lineage.experiment,
                    parent_run_id=state.lineage.run_id, tags={"prefect.flow_run_id": _flow_run_id() or ""},
                    ray_address=state.ray_address, job_env=state.job_env, return_state=True)

            (result,) = stages.run(f"transfer-{dataset}-{method}", run, child_run=False)
            results.append(result)
    table = transfer_table(results)
    _log_table(state.lineage, state.lineage.run_id, table, "transfer_results", {"results": results})
    state.lineage.parent.log_metrics({f"transfer_{r['dataset']}_{r['method']}_{r['metric']}": r["value"]
                                      for r in results}, step=0)
    return {"results": results, "table": table}


#: Stages after evaluation, by name, run in the order of the flow's ``post_training`` parameter. Each takes the
#: ``PipelineState`` and the flow's stage runner, runs its tasks through ``stages.run`` and returns its result (None:
#: nothing to do), which lands in ``state.outputs[name]`` and the summary.
POST_TRAINING_STAGES: dict[str, Callable[[PipelineState, _Stages], dict[str, Any] | None]] = {
    "register": register_stage, "transfer": transfer_stage}


# --- the flow ---------------------------------------------------------------------------------------------------------


class _Stages:
    """Runs stages: timing, Prefect state (Completed/Cached), the MLflow child run, and errors naming the stage."""

    def __init__(self, lineage: Lineage) -> None:
        self.lineage = lineage
        self.record: dict[str, dict[str, Any]] = {}
        self.logger = get_run_logger()

    def run(self, name: str, *calls: Callable[[], Any], child_run: bool = True,
            log: Callable[[Any, list[Any]], None] | None = None) -> list[Any]:
        """Call each thunk (a task called with ``return_state=True``); return the results."""
        started = time.perf_counter()
        child = self.lineage.child(name) if child_run else None
        states, results = [], []
        try:
            for call in calls:
                state = call()
                states.append(state)
                results.append(state.result())  # raises the task's exception
        except BaseException as exc:
            seconds = time.perf_counter() - started
            self.record[name] = {"state": "Failed", "seconds": round(seconds, 1)}
            child = child or self.lineage.child(name)
            child.set_tags({"alexnet.error": str(exc)[:4000]})
            child.log_metrics({"stage_seconds": seconds}, step=0)
            child.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            if isinstance(exc, Exception):
                raise StageFailed(name, exc) from exc
            raise
        seconds = time.perf_counter() - started
        cached = all(s.name == "Cached" for s in states)
        self.record[name] = {"state": "Cached" if cached else "Completed", "seconds": round(seconds, 1)}
        self.logger.info("stage %s: %s in %.1f s", name, self.record[name]["state"], seconds)
        if child is not None:
            child.set_tags({"alexnet.cached": str(cached).lower(),
                            "prefect.task_run_ids": ",".join(str(s.state_details.task_run_id) for s in states)})
            if log:
                log(child, results)
            child.log_metrics({"stage_seconds": seconds}, step=0)
            child.end()
        return results


def _refresh(stage: str, refresh: list[str], missing: bool = False) -> bool:
    return missing or stage in refresh or "all" in refresh


@flow(name="alexnet", log_prints=True, validate_parameters=True)
def alexnet_flow(
    preset: str = "configs/smoke.yaml",
    overrides: list[str] = [],  # noqa: B006 - Prefect copies parameters; never mutated
    raw_uri: str = "runs/smoke/imagenet-official",
    data_uri: str = "runs/smoke/prepared",
    source_uri: str | None = None,
    synthetic: bool = False,
    synthetic_spec: SyntheticImageNet = SyntheticImageNet(),
    download_verify: bool = True,
    shard_rows: int | None = None,
    max_bad_fraction: float = 0.01,
    image_format: Literal["jpeg", "raw"] = "jpeg",
    quality: int = 90,
    crops: list[int] = [1, 10],  # noqa: B006
    eval_batch_size: int = 128,
    eval_limit: int | None = None,
    ray_address: str | None = None,
    mlflow_tracking_uri: str | None = None,
    results_dir: str | None = None,
    refresh: list[str] = [],  # noqa: B006
    post_training: list[str] = ["register", "transfer"],  # noqa: B006
    model_alias: str = "champion",
    checkpoint: str | None = None,
    transfer_data: TransferData = TransferData(),
) -> dict[str, Any]:
    """AlexNet from the official ILSVRC-2012 files to a paper-comparable results table, resumable and tracked.

    Args:
        preset: training preset (``configs/paper.yaml``, ``configs/smoke.yaml``).
        overrides: ``section.key=value`` config overrides (``data.data`` is set from ``data_uri``).
        raw_uri: where the official files are (or are downloaded / synthesised to): a folder or ``s3://``.
        data_uri: where the prepared dataset goes (folder or ``s3://``).
        source_uri: download the official files from here into ``raw_uri`` first (https://, s3:// or a folder).
        synthetic: write a tiny synthetic ImageNet (``synthetic_spec``) into ``raw_uri`` first (smoke runs).
        download_verify: check the published MD5s of downloaded files.
        shard_rows: images per Parquet shard (default: about 96 MB per shard).
        max_bad_fraction: fail ``prepare`` when more than this fraction of the inputs cannot be decoded.
        image_format: how prepared images are stored: ``jpeg`` or ``raw``.
        quality: JPEG quality of the stored images.
        crops: evaluations to run (1: centre crop, 10: the paper's ten crops).
        eval_batch_size: images per evaluation batch.
        eval_limit: evaluate only this many validation images (None: the whole split).
        ray_address: a Ray cluster to submit the heavy stages to as Ray jobs (default ``RAY_ADDRESS``; none or
            ``local``: a local Ray in this process).
        mlflow_tracking_uri: MLflow store (default: the preset's, ``MLFLOW_TRACKING_URI``, ``sqlite:///mlflow.db``).
        results_dir: folder for Prefect's persisted task results (the cache); default ``PREFECT_LOCAL_STORAGE_PATH``.
        refresh: stages to recompute even when cached (``["all"]`` for every one).
        post_training: stages after evaluation, from ``POST_TRAINING_STAGES``.
        model_alias: registry alias given to the model when it is the best so far (``tracking.registered_model``).
        checkpoint: transfer from this ImageNet checkpoint (``alexnet train`` checkpoint or torchvision weights)
            instead of training one: the ImageNet stages do not run (the ``alexnet/transfer`` deployment).
        transfer_data: where the transfer stage finds each dataset's archives and puts its prepared copy.
    """
    from alexnet.config import load_config
    from alexnet.tracking import git_commit, resolve_tracking_uri
    from pipelines import storage

    from prefect.runtime import deployment, flow_run

    logger = get_run_logger()
    for name in ("prefect.flow_runs", "prefect.task_runs", None):  # the Prefect API's log handlers, the console's
        redact_handlers(logging.getLogger(name))
    if synthetic and source_uri:
        raise ValueError("pass either synthetic=True or source_uri, not both (both write into raw_uri)")
    unknown = sorted(set(post_training) - set(POST_TRAINING_STAGES))
    if unknown or not set(crops) <= {1, 10} or not crops:
        raise ValueError(f"post_training must name stages of {sorted(POST_TRAINING_STAGES)} (not {unknown}); "
                         f"crops must be 1 and/or 10 (not {crops})")
    raw_uri, data_uri = storage.absolute(raw_uri), storage.absolute(data_uri)
    ray_address = cluster_address(ray_address)  # "local" (or nothing) is a local instance, as for ray.init

    # The config is resolved once, up front: a bad preset or override fails here, before any work.
    cfg = load_config(preset, [*overrides, f"data.data={data_uri}"])
    cfg.train.storage_path = storage.absolute(cfg.train.storage_path)
    cfg.tracking.tracking_uri = tracking_uri = resolve_tracking_uri(mlflow_tracking_uri or cfg.tracking.tracking_uri
                                                                    or None)
    config = cfg.to_dict()
    training_config = {k: v for k, v in config.items() if k != "transfer"}  # transfer settings do not change training
    job_env = _job_env(tracking_uri) if ray_address else {}
    if ray_address:  # before any work: a stage's job would be refused later anyway
        refuse_secrets_in_jobs({"raw_uri": raw_uri, "data_uri": data_uri, "checkpoint": checkpoint or ""}
                               | {k: str(v) for k, v in cfg.flat().items()})

    options: dict[str, Any] = {}
    if results_dir:
        options["result_storage"] = Path(storage.absolute(results_dir))

    def task_with(t, stage: str, missing: bool = False):
        return t.with_options(refresh_cache=_refresh(stage, refresh, missing), **options)

    run_id, run_name = flow_run.id, flow_run.name
    lineage = Lineage(tracking_uri, cfg.tracking.experiment, run_name=f"flow-{run_name}", tags={
        "prefect.flow_run_id": str(run_id), "prefect.flow_run_name": str(run_name),
        "prefect.deployment": deployment.name or "", "git_commit": git_commit(),
        "alexnet.preset": preset, "alexnet.ray_address": ray_address or "local"})
    lineage.parent.log_params({"flow.preset": preset, "flow.overrides": " ".join(overrides), "flow.raw_uri": raw_uri,
                               "flow.data_uri": data_uri, "flow.source_uri": source_uri or "",
                               "flow.synthetic": synthetic, "flow.ray_address": ray_address or ""} | cfg.flat())
    logger.info("MLflow parent run %s (experiment %r, %s); heavy stages %s", lineage.run_id, cfg.tracking.experiment,
                redact_uri(tracking_uri),
                f"as Ray jobs on {redact_uri(ray_address)}" if ray_address else "in this process (local Ray)")
    stages = _Stages(lineage)
    try:
        summary: dict[str, Any] = {
            "mlflow": {"run_id": None, "parent_run_id": lineage.run_id, "tracking_uri": redact_uri(tracking_uri),
                       "experiment": cfg.tracking.experiment, "ui": redact_text(_ui_hint(tracking_uri))},
            "prefect": {"flow_run_id": str(run_id), "flow_run_name": run_name},
        }
        if checkpoint:  # transfer from a given ImageNet checkpoint: the ImageNet stages do not run
            trained_checkpoint, training_run_id, evaluations = checkpoint, None, {}
            summary["checkpoint"] = checkpoint
        else:
            if synthetic:
                spec = synthetic_spec.model_dump()
                stages.run("synthesize", lambda: task_with(synthesize, "synthesize", missing=not storage.exists(
                    storage.join(raw_uri, "synth_info.json")))(raw_uri, **spec, return_state=True),
                    log=lambda run, r: run.log_params(spec))
            if source_uri:
                from pipelines.formats import IMAGENET_FILES

                missing = not all(storage.exists(storage.join(raw_uri, f)) for f in IMAGENET_FILES)
                stages.run("download", lambda: task_with(download, "download", missing)(
                    source_uri, raw_uri, verify=download_verify, return_state=True))

            from pipelines.prepare import MANIFEST
            from pipelines.stats import STATS

            (dataset,) = stages.run("prepare", lambda: task_with(
                prepare, "prepare", missing=not storage.exists(storage.join(data_uri, MANIFEST)))(
                    raw_uri, data_uri, shard_rows=shard_rows, max_bad_fraction=max_bad_fraction,
                    image_format=image_format, quality=quality, ray_address=ray_address, job_env=job_env,
                    return_state=True),
                log=lambda run, r: (run.log_dict(r[0], "dataset.json"),
                                    run.set_tags({"data_manifest_sha256": r[0]["manifest_sha256"]})))
            lineage.parent.set_tags({"data_manifest_sha256": dataset["manifest_sha256"]})

            (computed,) = stages.run("stats", lambda: task_with(
                stats, "stats", missing=not storage.exists(storage.join(data_uri, STATS)))(
                    data_uri, ray_address=ray_address, job_env=job_env, return_state=True),
                log=lambda run, r: (run.log_dict(r[0], "stats.json"),
                                    run.set_tags({"stats_sha256": r[0].get("mean_image_sha256", "")})))
            stats_sha = computed.get("mean_image_sha256") or _sha256(json.dumps(computed, sort_keys=True).encode())
            lineage.parent.set_tags({"stats_sha256": stats_sha})

            lineage_tags = {"alexnet.stage": "train", "prefect.flow_run_id": str(run_id), "git_commit": git_commit(),
                            "data_manifest_sha256": dataset["manifest_sha256"], "stats_sha256": stats_sha}
            train_state: dict[str, Any] = {}

            def run_train():
                state = task_with(train, "train")(training_config, data_uri, parent_run_id=lineage.run_id,
                                                  tags=lineage_tags,
                                                  ray_address=ray_address, job_env=job_env, return_state=True)
                train_state["cached"] = state.name == "Cached"
                return state

            # The training run (made by rank 0 of run_training) is this stage's child run; a cached train stage gets a
            # child run of its own that points at the earlier training run.
            (trained,) = stages.run("train", run_train, child_run=False)
            training_run_id = trained.get("mlflow_run_id")
            if training_run_id:
                _adopt_training_run(lineage, training_run_id, lineage_tags, cached=train_state["cached"])
            lineage.parent.set_tags({"alexnet.training_run_id": training_run_id or ""})
            lineage.parent.log_metrics({f"train_{k}": v for k, v in trained["metrics"].items() if k != "epoch"}, step=0)

            evaluate_task = task_with(evaluate, "evaluate")
            gpus = 1 if cfg.train.use_gpu else 0
            results = stages.run("evaluate", *[
                (lambda n=n: evaluate_task(trained["checkpoint"], data_uri, crops=n, batch_size=eval_batch_size,
                                           limit=eval_limit, ray_address=ray_address, job_env=job_env, gpus=gpus,
                                           return_state=True)) for n in sorted(crops)],
                log=lambda run, r: _log_evaluations(lineage, run.run_id, training_run_id, r, preset))
            evaluations = {e["crops"]: e for e in results}
            _log_evaluations(lineage, lineage.run_id, None, results, preset)

            trained_checkpoint = trained["checkpoint"]
            summary.update({
                "data": data_uri,
                "splits": dataset["splits"],
                "rejects": dataset["rejects"],
                "eigval": [round(v, 6) for v in computed["eigval"]],
                "mean_rgb": [round(v, 4) for v in computed["mean_rgb"]],
                "train": {"epochs": trained.get("epochs"), "checkpoint": trained["checkpoint"],
                          "val_top1_err": trained["metrics"].get("val_top1_err")},
                "val_error": {f"{c} crop{'s' if c > 1 else ''}": {"top1": round(e["top1_err"], 4),
                                                                  "top5": round(e["top5_err"], 4)}
                              for c, e in sorted(evaluations.items())},
                "paper_val_error": {"10 crops": {"top1": PAPER_VAL_ERRORS["top1_err"],
                                                 "top5": PAPER_VAL_ERRORS["top5_err"]}},
                "chance_top1_error": round(1 - 1 / dataset["num_classes"], 4),
                "data_manifest_sha256": dataset["manifest_sha256"],
                "stats_sha256": stats_sha,
            })
            summary["mlflow"]["run_id"] = training_run_id

        state = PipelineState(config, data_uri, trained_checkpoint, training_run_id, evaluations, lineage,
                              ray_address, job_env, dict(flow_run.parameters or {}) | {"model_alias": model_alias},
                              task_with=task_with)
        for name in post_training:
            result = POST_TRAINING_STAGES[name](state, stages)
            if result is None:
                logger.info("post-training stage %s: nothing to do", name)
                continue
            state.outputs[name] = result
        summary["post_training"] = state.outputs
        summary["registered_model"] = state.outputs.get("register")
        summary["transfer"] = (state.outputs.get("transfer") or {}).get("table")
        summary["stages"] = dict(stages.record)
        summary["timings_s"] = {k: v["seconds"] for k, v in stages.record.items()}
        stages.run("report", lambda: report(summary, return_state=True), child_run=False)
        summary["stages"] = dict(stages.record)
        summary["timings_s"] = {k: v["seconds"] for k, v in stages.record.items()}
        lineage.parent.log_metrics({f"stage_seconds_{k}": v for k, v in summary["timings_s"].items()}, step=0)
        lineage.parent.log_dict(summary, "summary.json")
        lineage.log_text(lineage.run_id, format_report(summary), "summary.txt")
    except BaseException as exc:
        lineage.parent.set_tags({"alexnet.error": str(exc)[:4000]})
        lineage.parent.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    lineage.parent.end()
    return summary


def _ui_hint(tracking_uri: str) -> str:
    from alexnet.tracking import DEFAULT_STORE, resolve_tracking_uri

    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    if tracking_uri == resolve_tracking_uri(DEFAULT_STORE):
        return "make mlflow-ui   (then http://127.0.0.1:5000)"
    return f"MLFLOW_TRACKING_URI={tracking_uri} make mlflow-ui   (then http://127.0.0.1:5000)"


def _adopt_training_run(lineage: Lineage, training_run_id: str, tags: dict[str, str], *, cached: bool) -> None:
    """Make the training run this flow run's train child. ``run_training`` tags a run it creates itself; a run made
    by a Ray job (the CLI has no parent option) or reopened from a checkpoint (training resumed after an interrupted
    flow run) is re-tagged here. A cached train stage gets a child run of its own pointing at the training run."""
    if cached:
        child = lineage.child("train", {"alexnet.cached": "true", "alexnet.training_run_id": training_run_id})
        child.end()
        return
    client = lineage.client()
    try:
        current = client.get_run(training_run_id).data.tags
    except Exception:  # noqa: BLE001 - a run in another store (tracking disabled, or a different URI)
        return
    for k, v in {**tags, "mlflow.parentRunId": lineage.run_id}.items():
        if current.get(k) != v:
            client.set_tag(training_run_id, k, v)


def _log_table(lineage: Lineage, run_id: str, table: dict[str, list], name: str, details: dict[str, Any]) -> None:
    """A results table as ``<name>.json`` (rows plus ``details``), ``.md``, ``.csv`` and an MLflow table."""
    client = lineage.client()
    rows = [dict(zip(table, row)) for row in zip(*table.values())]
    client.log_text(run_id, json.dumps({"results": rows, **details}, indent=2, default=str), f"{name}.json")
    client.log_text(run_id, markdown(table), f"{name}.md")
    client.log_text(run_id, csv_text(table), f"{name}.csv")
    client.log_table(run_id, data=table, artifact_file=f"{name}_table.json")


def _log_evaluations(lineage: Lineage, run_id: str, training_run_id: str | None, results: list[dict[str, Any]],
                     preset: str) -> None:
    """The results table (results.json, .md, .csv and an MLflow table) and the errors as metrics of ``run_id``;
    the errors also go to the training run (as ``alexnet evaluate`` logs them)."""
    from mlflow.entities import Metric

    client = lineage.client()
    evaluations = {e["crops"]: e for e in results}
    table = imagenet_table(evaluations, preset=preset)
    now = int(time.time() * 1000)
    metrics = []
    for crops, e in evaluations.items():
        metrics += [Metric(f"val_top1_err_{crops}crop", e["top1_err"], now, 0),
                    Metric(f"val_top5_err_{crops}crop", e["top5_err"], now, 0)]
    client.log_batch(run_id, metrics=metrics)
    _log_table(lineage, run_id, table, "results", {"evaluations": evaluations, "paper_1cnn_10crop": PAPER_VAL_ERRORS})
    if training_run_id:
        try:
            client.log_batch(training_run_id, metrics=[
                Metric(f"eval_val_{c}crop_{k}", e[k], now, int(e.get("epoch") or 0))
                for c, e in evaluations.items() for k in ("top1_err", "top5_err")])
        except Exception:  # noqa: BLE001 - the training run may live in another store (a checkpoint from elsewhere)
            pass
