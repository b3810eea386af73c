"""The Prefect flow ``alexnet``: the whole reproduction as one resumable, tracked run.

Stages, each a task calling exactly one library function (the same one the CLI calls)::

    [synthesize]  pipelines.synth.write_synthetic_imagenet   only with synthetic=True (smoke runs)
    [download]    pipelines.download.download_imagenet        only when source_uri is given
    prepare       pipelines.prepare.prepare_imagenet          Ray Data -> Parquet shards + manifest.json
    stats         pipelines.stats.compute_stats               stats.json + mean_image.npy
    train         alexnet.train.run_training                  Ray Train, MLflow training run from rank 0
    evaluate      alexnet.evaluate.evaluate_checkpoint        centre crop and the paper's 10 crops
    [post-training stages]  POST_TRAINING_STAGES, in the order of ``post_training``:
      register    alexnet.registry.promote_model              MLflow registry alias for the best model
      transfer    per dataset of the preset's ``transfer`` section (Caltech-101, Flowers-102, VOC 2007):
                  [synthesize|download] + prepare (prepare_dataset), then per method
                  alexnet.transfer.run_transfer               linear probe (Ray Data actors) / fine-tuning (Ray Train)
    report        alexnet.results.format_report               the short summary (printed and returned)

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

**Where the heavy stages run** (``flows/ray_jobs.py``). Each heavy stage is one function of ``flows/stages.py``
called through ``run_stage`` on JSON kwargs: without a Ray address (or with ``local``, Ray's name for it) in this
process on a local Ray (as ``make smoke``); with ``ray_address`` (or ``RAY_ADDRESS``) prepare, stats, train,
evaluate and transfer are submitted to that cluster as **Ray jobs** running ``python -m flows.job
flows.stages:<stage> <base64 JSON kwargs>`` with the repository as ``working_dir``, whose result comes back on
one marked line; their logs stream into the task's log and a failed or stopped job fails the stage with the tail
of its logs. The address may be the dashboard (``http://head:8265``), the GCS (``head:6379``) or a Ray Client
address. Ray 2.60 clusters started with ``ray start --head`` require token authentication: the process running
the flow needs ``RAY_AUTH_MODE=token`` and the cluster's token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``; ``ray get-auth-token`` prints it). Local paths are made absolute before submission, so
they must be visible on the cluster (one machine or a shared file system; use ``s3://`` otherwise), and so must
the MLflow store (``MLFLOW_TRACKING_URI``, passed to every job). The jobs' interpreter is named, not taken from
the cluster's ``PATH``: ``ALEXNET_RAY_JOB_PYTHON``, else this process's ``sys.executable`` where the cluster has
it, else ``python``. Synthesis, download and the MLflow bookkeeping always run in the flow's process; nothing here
imports torch, so a Prefect worker can stay small.

Layout: ``flows/caching.py`` (dataset identity, cache policies), ``flows/tasks.py`` (one task per stage),
``flows/stages.py`` (the JSON-in, JSON-out stage functions), ``flows/ray_jobs.py`` + ``flows/job.py`` (where they
run), ``flows/lineage.py`` (MLflow parent and child runs, tables), ``flows/post_training.py`` (register,
transfer).

Run it::

    python -m flows.smoke                                          # make smoke: synthetic data, local everything
    prefect deploy --all && prefect deployment run alexnet/smoke   # prefect.yaml: smoke and full-reproduction
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from alexnet.results import PAPER_VAL_ERRORS, format_report
from flows.caching import refresh as _needs_refresh
from flows.caching import sha256
from flows.lineage import Lineage, StageFailed, StageRunner, ui_hint
from flows.post_training import POST_TRAINING_STAGES, PipelineState
from flows.ray_jobs import job_env as make_job_env
from flows.ray_jobs import refuse_secrets_in_jobs
from flows.tasks import (TRAINING_SECTIONS, download, evaluate, prepare, prepare_options, report, stats,
                         synthesize, train)
from pipelines.redact import redact_handlers, redact_text, redact_uri
from pipelines.rayutil import cluster_address

__all__ = ["POST_TRAINING_STAGES", "PipelineState", "StageFailed", "alexnet_flow", "format_report"]


@flow(name="alexnet", log_prints=True, validate_parameters=True)
def alexnet_flow(
    preset: str = "configs/smoke.yaml",
    overrides: list[str] = [],  # noqa: B006 - Prefect copies parameters; never mutated
    raw_uri: str = "runs/smoke/imagenet-official",
    data_uri: str = "runs/smoke/prepared",
    source_uri: str | None = None,
    synthetic: bool = False,
    ray_address: str | None = None,
    mlflow_tracking_uri: str | None = None,
    results_dir: str | None = None,
    refresh: list[str] = [],  # noqa: B006
    post_training: list[str] = ["register", "transfer"],  # noqa: B006
    model_alias: str = "champion",
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """AlexNet from the official ILSVRC-2012 files to a paper-comparable results table, resumable and tracked.

    Everything else is the preset's (``alexnet.config``), changed with ``overrides``: the image recipe and
    shards (``prepare.*``), the synthetic ImageNet (``synthetic.*``), the crops and batching of the evaluation
    (``evaluate.*``) and the transfer datasets' locations (``transfer_data.*``).

    Args:
        preset: training preset (``configs/paper.yaml``, ``configs/smoke.yaml``).
        overrides: ``section.key=value`` config overrides (``data.data`` is set from ``data_uri``), e.g.
            ``prepare.shard_rows=128``, ``evaluate.crops=[1]``, ``transfer_data.raw_root=/data/transfer-raw``.
        raw_uri: where the official files are (or are downloaded / synthesised to): a folder or ``s3://``.
        data_uri: where the prepared dataset goes (folder or ``s3://``).
        source_uri: download the official files from here into ``raw_uri`` first (https://, s3:// or a folder).
        synthetic: write a tiny synthetic ImageNet (the preset's ``synthetic`` section) into ``raw_uri`` first.
        ray_address: a Ray cluster to submit the heavy stages to as Ray jobs (default ``RAY_ADDRESS``; none or
            ``local``: a local Ray in this process).
        mlflow_tracking_uri: MLflow store (default: the preset's, ``MLFLOW_TRACKING_URI``, ``sqlite:///mlflow.db``).
        results_dir: folder for Prefect's persisted task results (the cache); default ``PREFECT_LOCAL_STORAGE_PATH``.
        refresh: stages to recompute even when cached (``["all"]`` for every one).
        post_training: stages after evaluation, from ``POST_TRAINING_STAGES``.
        model_alias: registry alias given to the model when it is the best so far (``tracking.registered_model``).
        checkpoint: transfer from this ImageNet checkpoint (``alexnet train`` checkpoint or torchvision weights)
            instead of training one: the ImageNet stages do not run (the ``alexnet/transfer`` deployment).
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
    if unknown:
        raise ValueError(f"post_training must name stages of {sorted(POST_TRAINING_STAGES)} (not {unknown})")
    raw_uri, data_uri = storage.absolute(raw_uri), storage.absolute(data_uri)
    ray_address = cluster_address(ray_address)  # "local" (or nothing) is a local instance, as for ray.init

    # The config is resolved once, up front: a bad preset or override fails here, before any work.
    cfg = load_config(preset, [*overrides, f"data.data={data_uri}"])
    crops = cfg.evaluate.crops
    if not crops or not set(crops) <= {1, 10}:
        raise ValueError(f"evaluate.crops must be 1 and/or 10 (not {crops})")
    cfg.train.storage_path = storage.absolute(cfg.train.storage_path)
    cfg.tracking.tracking_uri = tracking_uri = resolve_tracking_uri(mlflow_tracking_uri or cfg.tracking.tracking_uri
                                                                    or None)
    config = cfg.to_dict()
    job_env = make_job_env(tracking_uri) if ray_address else {}
    if ray_address:  # before any work: a stage's job would be refused later anyway
        refuse_secrets_in_jobs({"raw_uri": raw_uri, "data_uri": data_uri, "checkpoint": checkpoint or ""}
                               | {k: str(v) for k, v in cfg.flat().items()})

    options: dict[str, Any] = {}
    if results_dir:
        options["result_storage"] = Path(storage.absolute(results_dir))

    def task_with(t, stage: str, missing: bool = False):
        return t.with_options(refresh_cache=_needs_refresh(stage, refresh, missing), **options)

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
    stages = StageRunner(lineage)
    where = {"ray_address": ray_address, "job_env": job_env}
    try:
        summary: dict[str, Any] = {
            "mlflow": {"run_id": None, "parent_run_id": lineage.run_id, "tracking_uri": redact_uri(tracking_uri),
                       "experiment": cfg.tracking.experiment, "ui": redact_text(ui_hint(tracking_uri))},
            "prefect": {"flow_run_id": str(run_id), "flow_run_name": run_name},
        }
        if checkpoint:  # transfer from a given ImageNet checkpoint: the ImageNet stages do not run
            trained_checkpoint, training_run_id, evaluations = checkpoint, None, {}
            summary["checkpoint"] = checkpoint
        else:
            if synthetic:
                _synthesize_stage(stages, task_with, raw_uri, config["synthetic"])
            if source_uri:
                _download_stage(stages, task_with, source_uri, raw_uri, cfg.prepare.verify_downloads)
            dataset = _prepare_stage(stages, task_with, raw_uri, data_uri, where, prepare_options(config))
            lineage.parent.set_tags({"data_manifest_sha256": dataset["manifest_sha256"]})
            computed, stats_sha = _stats_stage(stages, task_with, data_uri, where)
            lineage.parent.set_tags({"stats_sha256": stats_sha})
            trained = _train_stage(stages, task_with, lineage, config, data_uri, where, tags={
                "alexnet.stage": "train", "prefect.flow_run_id": str(run_id), "git_commit": git_commit(),
                "data_manifest_sha256": dataset["manifest_sha256"], "stats_sha256": stats_sha})
            training_run_id, trained_checkpoint = trained.get("mlflow_run_id"), trained["checkpoint"]
            evaluations = _evaluate_stage(stages, task_with, lineage, trained, data_uri, where, preset=preset,
                                          crops=crops, batch_size=cfg.evaluate.batch_size,
                                          limit=cfg.evaluate.limit or None, gpus=1 if cfg.train.use_gpu else 0)
            summary.update(_imagenet_summary(data_uri, dataset, computed, stats_sha, trained, evaluations))
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
        summary["stages"], summary["timings_s"] = dict(stages.record), stages.timings()
        stages.run("report", lambda: report(summary, return_state=True), child_run=False)
        summary["stages"], summary["timings_s"] = dict(stages.record), stages.timings()
        lineage.parent.log_metrics({f"stage_seconds_{k}": v for k, v in summary["timings_s"].items()}, step=0)
        lineage.parent.log_dict(summary, "summary.json")
        lineage.log_text(lineage.run_id, format_report(summary), "summary.txt")
    except BaseException as exc:
        lineage.parent.set_tags({"alexnet.error": str(exc)[:4000]})
        lineage.parent.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    lineage.parent.end()
    return summary


# --- the ImageNet stages, in the flow's order --------------------------------------------------------------------------


def _synthesize_stage(stages: StageRunner, task_with, raw_uri: str, spec: dict[str, Any]) -> None:
    from pipelines import storage

    missing = not storage.exists(storage.join(raw_uri, "synth_info.json"))
    stages.run("synthesize", lambda: task_with(synthesize, "synthesize", missing)(raw_uri, **spec, return_state=True),
               log=lambda run, r: run.log_params(spec))


def _download_stage(stages: StageRunner, task_with, source_uri: str, raw_uri: str, verify: bool) -> None:
    from pipelines import storage
    from pipelines.formats import IMAGENET_FILES

    missing = not all(storage.exists(storage.join(raw_uri, f)) for f in IMAGENET_FILES)
    stages.run("download", lambda: task_with(download, "download", missing)(source_uri, raw_uri, verify=verify,
                                                                             return_state=True))


def _prepare_stage(stages: StageRunner, task_with, raw_uri: str, data_uri: str, where: dict[str, Any],
                   recipe: dict[str, Any]) -> dict[str, Any]:
    from pipelines import storage
    from pipelines.prepare import MANIFEST

    missing = not storage.exists(storage.join(data_uri, MANIFEST))
    (dataset,) = stages.run("prepare", lambda: task_with(prepare, "prepare", missing)(
        raw_uri, data_uri, **recipe, **where, return_state=True),
        log=lambda run, r: (run.log_dict(r[0], "dataset.json"),
                            run.set_tags({"data_manifest_sha256": r[0]["manifest_sha256"]})))
    return dataset


def _stats_stage(stages: StageRunner, task_with, data_uri: str, where: dict[str, Any]) -> tuple[dict[str, Any], str]:
    from pipelines import storage
    from pipelines.stats import STATS

    missing = not storage.exists(storage.join(data_uri, STATS))
    (computed,) = stages.run("stats", lambda: task_with(stats, "stats", missing)(data_uri, **where,
                                                                                return_state=True),
                             log=lambda run, r: (run.log_dict(r[0], "stats.json"),
                                                 run.set_tags({"stats_sha256": r[0].get("mean_image_sha256", "")})))
    return computed, computed.get("mean_image_sha256") or sha256(json.dumps(computed, sort_keys=True).encode())


def _train_stage(stages: StageRunner, task_with, lineage: Lineage, config: dict[str, Any], data_uri: str,
                 where: dict[str, Any], *, tags: dict[str, str]) -> dict[str, Any]:
    """The training run (made by rank 0 of run_training) is this stage's child run; a cached train stage gets a child
    run of its own that points at the earlier training run."""
    training_config = {k: v for k, v in config.items() if k in TRAINING_SECTIONS}  # nothing else changes training
    cached = {}

    def run_train():
        state = task_with(train, "train")(training_config, data_uri, parent_run_id=lineage.run_id, tags=tags,
                                          **where, return_state=True)
        cached["train"] = state.name == "Cached"
        return state

    (trained,) = stages.run("train", run_train, child_run=False)
    training_run_id = trained.get("mlflow_run_id")
    if training_run_id:
        lineage.adopt_training_run(training_run_id, tags, cached=cached["train"])
    lineage.parent.set_tags({"alexnet.training_run_id": training_run_id or ""})
    lineage.parent.log_metrics({f"train_{k}": v for k, v in trained["metrics"].items() if k != "epoch"}, step=0)
    return trained


def _evaluate_stage(stages: StageRunner, task_with, lineage: Lineage, trained: dict[str, Any], data_uri: str,
                    where: dict[str, Any], *, preset: str, crops: list[int], batch_size: int, limit: int | None,
                    gpus: float) -> dict[int, dict[str, Any]]:
    training_run_id = trained.get("mlflow_run_id")
    evaluate_task = task_with(evaluate, "evaluate")
    results = stages.run("evaluate", *[
        (lambda n=n: evaluate_task(trained["checkpoint"], data_uri, crops=n, batch_size=batch_size, limit=limit,
                                   gpus=gpus, **where, return_state=True)) for n in sorted(crops)],
        log=lambda run, r: lineage.log_evaluations(run.run_id, training_run_id, r, preset))
    lineage.log_evaluations(lineage.run_id, None, results, preset)
    return {e["crops"]: e for e in results}


def _imagenet_summary(data_uri: str, dataset: dict[str, Any], computed: dict[str, Any], stats_sha: str,
                      trained: dict[str, Any], evaluations: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {
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
        "paper_val_error": {"10 crops": {"top1": PAPER_VAL_ERRORS["top1_err"], "top5": PAPER_VAL_ERRORS["top5_err"]}},
        "chance_top1_error": round(1 - 1 / dataset["num_classes"], 4),
        "data_manifest_sha256": dataset["manifest_sha256"],
        "stats_sha256": stats_sha,
    }
