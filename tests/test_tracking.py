"""MLflow system metrics (CPU, memory; GPU where present) on training runs, switchable in the config."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow

from alexnet.config import load_config
from alexnet.tracking import RunLogger

ROOT = Path(__file__).resolve().parents[1]
CPU = "system/cpu_utilization_percentage"


def _system_metrics(store: str, run_id: str) -> dict[str, float]:
    metrics = mlflow.MlflowClient(store).get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if k.startswith("system/")}


def test_a_run_shorter_than_the_sampling_interval_still_gets_a_sample(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    on = RunLogger(store, "sysmetrics", run_name="on", system_metrics=True)
    time.sleep(0.5)
    on.end()
    metrics = _system_metrics(store, on.run_id)
    assert CPU in metrics and "system/system_memory_usage_megabytes" in metrics, sorted(metrics)
    assert 0 <= metrics[CPU] <= 100 and metrics["system/system_memory_usage_megabytes"] > 0
    assert mlflow.MlflowClient(store).get_run(on.run_id).info.status == "FINISHED"

    reopened = RunLogger(store, "sysmetrics", run_name="on", run_id=on.run_id, system_metrics=True)
    reopened.end()  # a resumed run goes on from the next step
    steps = [m.step for m in mlflow.MlflowClient(store).get_metric_history(on.run_id, CPU)]
    assert steps == sorted(set(steps)) and len(steps) == 2

    off = RunLogger(store, "sysmetrics", run_name="off")  # the default: evaluation, figures, flow bookkeeping
    off.end()
    assert not _system_metrics(store, off.run_id)


def test_the_config_switch_defaults_on():
    assert load_config(ROOT / "configs" / "smoke.yaml").tracking.system_metrics is True
    off = load_config(ROOT / "configs" / "smoke.yaml", ["tracking.system_metrics=false"])
    assert off.tracking.system_metrics is False


def test_training_runs_log_system_metrics(trained_imagenet):
    """The training run of the shared fixture (3 epochs, 2 Ray Train workers): rank 0's MLflow run has them."""
    store = f"sqlite:///{trained_imagenet['tmp'] / 'mlflow.db'}"
    run_id = trained_imagenet["result"].mlflow_run_id
    metrics = _system_metrics(store, run_id)
    assert CPU in metrics and "system/system_memory_usage_percentage" in metrics, sorted(metrics)
    assert len(mlflow.MlflowClient(store).get_metric_history(run_id, CPU)) >= 1
