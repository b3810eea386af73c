"""The paper's ablations as a Prefect flow: one task calling ``alexnet.ablate.run_ablations`` (the function behind
``alexnet ablate``), which trains the paper net and each ablation as Ray Tune trials of Ray Train runs.

The flow is named ``alexnet`` like the reproduction's, so its deployment is ``alexnet/ablations`` beside
``alexnet/smoke`` and ``alexnet/full-reproduction`` (prefect.yaml)::

    prefect deployment run alexnet/ablations --watch --param data_uri=/data/imagenet-256

The task drives Ray Tune from the flow's process: on the local Ray, or on the cluster of ``ray_address`` (or
``RAY_ADDRESS``), whose nodes then run the trials side by side; locations must be visible to that cluster
(``s3://`` or a shared file system). Nothing here imports torch or Ray at import time.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alexnet.results import markdown


@task(name="ablate", cache_policy=NO_CACHE)
def ablate(config: dict[str, Any], *, only: list[str], ten_crop: bool, max_concurrent: int,
           ray_address: str | None) -> dict[str, Any]:
    """``run_ablations``: every trial resumes its own Ray Train run, so a rerun continues where it stopped."""
    from alexnet.ablate import run_ablations
    from alexnet.config import Config

    result = run_ablations(Config.from_dict(config), only=only or None, ten_crop=ten_crop,
                           max_concurrent=max_concurrent, ray_address=ray_address)
    return {"table": result.table, "mlflow_run_id": result.mlflow_run_id,
            "checkpoints": {name: t.get("checkpoint") for name, t in result.trials.items()}}


@flow(name="alexnet", flow_run_name="ablations", log_prints=True, validate_parameters=True)
def ablations_flow(
    preset: str = "configs/ablate-smoke.yaml",
    overrides: list[str] = [],  # noqa: B006 - Prefect copies parameters; never mutated
    data_uri: str = "runs/smoke/prepared",
    only: list[str] = [],  # noqa: B006
    ten_crop: bool = True,
    max_concurrent: int = 0,
    ray_address: str | None = None,
    mlflow_tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Train the paper net and its ablations (no LRN, 2/2 pooling, the one-GPU net, no lighting, no dropout) on
    the prepared ImageNet ``data_uri``, evaluate 1 vs 10 crops, and log the table beside the paper's deltas."""
    from alexnet.config import load_config

    cfg = load_config(preset, [*overrides, f"data.data={data_uri}"]
                      + ([f"tracking.tracking_uri={mlflow_tracking_uri}"] if mlflow_tracking_uri else []))
    result = ablate(cfg.to_dict(), only=list(only), ten_crop=ten_crop, max_concurrent=max_concurrent,
                    ray_address=ray_address or os.environ.get("RAY_ADDRESS") or None)
    get_run_logger().info("ablations (MLflow run %s):\n%s", result["mlflow_run_id"], markdown(result["table"]))
    return result
