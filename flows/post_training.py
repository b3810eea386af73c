"""The stages after evaluation, by name (the flow's ``post_training`` parameter): ``register`` (the MLflow registry
alias) and ``transfer`` (Caltech-101, Flowers-102, VOC 2007: data, then linear probe and fine-tuning)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flows.lineage import Lineage, StageRunner
from flows.tasks import download, prepare, prepare_options, register, synthesize_transfer, transfer


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return flow_run.id or ""


@dataclass
class PipelineState:
    """What the stages after training see: resolved config, data, checkpoint, evaluations, lineage and the flow's
    parameters."""

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


def register_stage(state: PipelineState, stages: StageRunner) -> dict[str, Any] | None:
    """Post-training stage "register": the registry step of ``tracking.registered_model`` (skipped when unset)."""
    name = state.config["tracking"]["registered_model"]
    if not name or not state.config["tracking"]["log_model"] or not state.training_run_id:
        return None
    best = state.evaluations[max(state.evaluations)]  # the most crops: the paper's protocol
    (result,) = stages.run("register", lambda: register(
        state.lineage.tracking_uri, name, state.training_run_id, state.parameters["model_alias"], best,
        {"prefect.flow_run_id": _flow_run_id(), "mlflow.parent_run_id": state.lineage.run_id},
        return_state=True))
    return result


def transfer_stage(state: PipelineState, stages: StageRunner) -> dict[str, Any] | None:
    """Post-training stage "transfer": for each dataset of the preset's ``transfer`` section, its data (synthesise or
    download, then prepare: stage ``transfer-<dataset>-data``) and each method (stage ``transfer-<dataset>-<method>``,
    whose MLflow run ``run_transfer`` makes under the parent run); then the table of all of them, beside the
    literature, on the parent run."""
    from alexnet.results import transfer_table
    from pipelines import storage

    if not state.checkpoint:
        return None
    cfg = state.config["transfer"]
    spec = state.config["transfer_data"]  # where the datasets are: the preset's transfer_data section
    synthetic = (spec["synthetic"] == "true" if spec["synthetic"] != "auto"
                 else bool(state.parameters.get("synthetic")))
    options = prepare_options(state.config, max_bad_fraction=spec["max_bad_fraction"]) | {"shard_rows": None}
    results = []
    for dataset in cfg["datasets"]:
        raw = storage.absolute(storage.join(spec["raw_root"], dataset))
        data = storage.absolute(storage.join(spec["data_root"], dataset))
        calls = []
        if synthetic:
            calls.append(lambda raw=raw, dataset=dataset: state.task_with(
                synthesize_transfer, "synthesize", not storage.exists(storage.join(raw, "synth_info.json")))(
                    dataset, raw, return_state=True))
        elif spec["source_uri"]:
            calls.append(lambda raw=raw, dataset=dataset: state.task_with(download, "download")(
                storage.join(spec["source_uri"], dataset), raw, verify=state.config["prepare"]["verify_downloads"],
                dataset=dataset, return_state=True))
        calls.append(lambda raw=raw, data=data, dataset=dataset: state.task_with(
            prepare, "prepare", not storage.exists(storage.join(data, "manifest.json")))(
                raw, data, **options, ray_address=state.ray_address, job_env=state.job_env, dataset=dataset,
                return_state=True))
        stages.run(f"transfer-{dataset}-data", *calls, log=lambda run, r: run.log_dict(r[-1], "dataset.json"))
        for method in cfg["methods"]:
            def run(data=data, dataset=dataset, method=method):
                return state.task_with(transfer, "transfer")(
                    dataset, method, data, state.checkpoint, config=cfg,
                    imagenet_stats=spec["imagenet_stats"] or None,
                    tracking_uri=state.lineage.tracking_uri, experiment=state.lineage.experiment,
                    parent_run_id=state.lineage.run_id, tags={"prefect.flow_run_id": _flow_run_id()},
                    ray_address=state.ray_address, job_env=state.job_env, return_state=True)

            (result,) = stages.run(f"transfer-{dataset}-{method}", run, child_run=False)
            results.append(result)
    table = transfer_table(results)
    state.lineage.log_table(state.lineage.run_id, table, "transfer_results", {"results": results})
    state.lineage.parent.log_metrics({f"transfer_{r['dataset']}_{r['method']}_{r['metric']}": r["value"]
                                      for r in results}, step=0)
    return {"results": results, "table": table}


#: Stages after evaluation, by name, run in the order of the flow's ``post_training`` parameter. Each takes the
#: ``PipelineState`` and the flow's stage runner, runs its tasks through ``stages.run`` and returns its result (None:
#: nothing to do), which lands in ``state.outputs[name]`` and the summary.
POST_TRAINING_STAGES: dict[str, Callable[[PipelineState, StageRunner], dict[str, Any] | None]] = {
    "register": register_stage, "transfer": transfer_stage}
