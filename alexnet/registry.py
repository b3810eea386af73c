"""The MLflow model registry step: tag the version a training run registered with its evaluation and lineage, and
move an alias (``champion``) to it when it is the best so far on the same data. The flow's ``register`` stage and
``alexnet register`` call :func:`promote_model`."""

from __future__ import annotations

from typing import Any


def promote_model(tracking_uri: str, model_name: str, training_run_id: str, alias: str,
                  evaluation: dict[str, Any], tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Find the version of ``model_name`` logged by ``training_run_id``, tag it with its ``evaluation``
    (``top1_err``, ``top5_err``, ``crops``, ``data_manifest_sha256``) and ``tags``, and point ``alias`` at it unless
    the current holder, evaluated on the same dataset, has a lower top-1 error. Returns the name, version, the
    alias (None when it did not move) and why."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    versions = client.search_model_versions(f"name='{model_name}' and run_id='{training_run_id}'")
    if not versions:
        raise ValueError(f"the training run {training_run_id} registered no version of {model_name!r} "
                         "(tracking.log_model must be true)")
    version = max(versions, key=lambda v: int(v.version))
    err = evaluation["top1_err"]
    manifest = evaluation.get("data_manifest_sha256") or ""
    for k, v in {**(tags or {}), "val_top1_err": f"{err:.6f}", "val_top5_err": f"{evaluation['top5_err']:.6f}",
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


def evaluation_of_run(tracking_uri: str, training_run_id: str, *, crops: int = 10, split: str = "val") -> dict[str, Any]:
    """The evaluation ``alexnet evaluate`` logged into a training run (metrics ``eval_<split>_<crops>crop_top1_err``
    and ``..._top5_err``) with the run's ``data_manifest_sha256`` tag: what :func:`promote_model` compares."""
    import mlflow

    run = mlflow.MlflowClient(tracking_uri).get_run(training_run_id)
    prefix = f"eval_{split}_{crops}crop"
    missing = [k for k in (f"{prefix}_top1_err", f"{prefix}_top5_err") if k not in run.data.metrics]
    if missing:
        raise ValueError(f"run {training_run_id} has no {', '.join(missing)}: evaluate its checkpoint first "
                         f"(`alexnet evaluate --checkpoint ... --data ... --crops {crops}` logs into the training run)")
    return {"top1_err": run.data.metrics[f"{prefix}_top1_err"], "top5_err": run.data.metrics[f"{prefix}_top5_err"],
            "crops": crops, "data_manifest_sha256": run.data.tags.get("data_manifest_sha256", "")}
