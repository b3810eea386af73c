"""MLflow, in one place: where the store is, and the run of a training job.

Side effects happen on rank 0 only (the caller checks); nothing here runs at import time. The store is MLflow's
own default, ``sqlite:///mlflow.db`` in the working directory, unless ``MLFLOW_TRACKING_URI`` or an explicit URI
says otherwise. Relative sqlite paths are made absolute on the driver, because Ray workers run elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pipelines.redact import redact_text, redact_values

log = logging.getLogger(__name__)

DEFAULT_STORE = "sqlite:///mlflow.db"
#: Seconds between samples of MLflow's system metrics (its default is 10): a smoke epoch lasts tens of seconds.
#: ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it.
SYSTEM_METRICS_INTERVAL_S = 5.0


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use, with a relative sqlite path (or a bare folder) made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def git_commit() -> str:
    """The commit of the code that runs (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_system_metrics(tracking_uri: str, run_id: str, *, resume: bool) -> Any | None:
    """MLflow's system metrics monitor (``system/cpu_utilization_percentage``, ``system/system_memory_usage_*``,
    disk, network, and ``system/gpu_*`` where pynvml finds NVIDIA GPUs) on the run ``run_id``, sampling every
    ``SYSTEM_METRICS_INTERVAL_S`` seconds in a thread of this process; ``None`` (with a warning) without psutil."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:
        log.warning("MLflow system metrics are off: %s (install psutil, or set tracking.system_metrics=false)", e)
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=resume,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """Stop ``monitor`` and log one last sample: MLflow's thread drops the samples of an unfinished interval, so
    a run shorter than the interval would otherwise have none."""
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001 - bookkeeping must not fail a finished training
        log.warning("could not log the last system metrics sample: %s", e)


class RunLogger:
    """One MLflow run: params, per-epoch metrics, artifacts and the model. Reopens a run by id on resume. With
    ``system_metrics``, MLflow's system metrics (CPU, memory, disk, network, GPU) are sampled until ``end``."""

    def __init__(self, tracking_uri: str, experiment: str, *, run_name: str, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 system_metrics: bool = False) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        exp = mlflow.get_experiment_by_name(experiment)
        experiment_id = exp.experiment_id if exp else mlflow.create_experiment(experiment)
        all_tags = redact_values(dict(tags or {}))
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self._client = mlflow.MlflowClient(tracking_uri)
        resume = run_id is not None
        if run_id is None:
            run = self._client.create_run(experiment_id, run_name=run_name, tags=all_tags)
            run_id = run.info.run_id
        else:
            self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._system_metrics = start_system_metrics(tracking_uri, run_id, resume=resume) if system_metrics else None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        # Values may hold URIs with credentials (a tracking URI with a password, a presigned source): redacted.
        fresh = [Param(k, redact_text(str(v))[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self._client.log_batch(self.run_id, params=fresh[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, redact_text(str(v)))

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        )

    def log_dict(self, obj: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(redact_values(obj), indent=2))
            self._client.log_artifact(self.run_id, str(path))

    def log_table(self, columns: dict[str, list[Any]], name: str) -> None:
        """An MLflow table (shown in the run's artifacts and the UI's evaluation view): columns of equal length."""
        self._client.log_table(self.run_id, data=redact_values(columns), artifact_file=name)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None:
        """A table (columns of equal length) that the MLflow UI shows and compares across runs."""
        self._client.log_table(self.run_id, data=table, artifact_file=artifact_file)

    def log_curves(self, history: list[dict[str, float]], name: str = "curves.png") -> None:
        """Loss, error and learning-rate curves over epochs, as one PNG artifact."""
        if not history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [h["epoch"] for h in history]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for key in ("train_loss", "val_loss"):
            axes[0].plot(epochs, [h.get(key) for h in history], label=key)
        for key in ("train_top1_err", "val_top1_err", "val_top5_err"):
            axes[1].plot(epochs, [h.get(key) for h in history], label=key)
        axes[2].semilogy(epochs, [h["lr"] for h in history], label="lr")
        for ax, title in zip(axes, ("loss", "error", "learning rate")):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.legend()
        fig.tight_layout()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            fig.savefig(path, dpi=100)
            plt.close(fig)
            self._client.log_artifact(self.run_id, str(path))

    def log_model(self, model: Any, *, input_shape: tuple[int, ...] = (1, 3, 224, 224),
                  registered_model: str | None = None) -> None:
        """The network as an MLflow PyTorch model (pickle format: any batch size), with its input signature."""
        import mlflow.pytorch
        import numpy as np

        example = np.zeros(input_shape, dtype=np.float32)
        with self._mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(model.eval(), name="model", serialization_format="pickle",
                                     input_example=example, registered_model_name=registered_model or None)

    def end(self, status: str = "FINISHED") -> None:
        if self._system_metrics is not None:
            stop_system_metrics(self._system_metrics)
            self._system_metrics = None
        self._client.set_terminated(self.run_id, status=status)
