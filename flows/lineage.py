"""The MLflow side of a flow run: one parent run, a child run per stage, the results tables; and the stage runner
that times each stage, records its Prefect state and names it in errors."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger

from alexnet.results import PAPER_VAL_ERRORS, class_tables, csv_text, imagenet_table, markdown
from pipelines.redact import redact_text


class StageFailed(RuntimeError):
    """A stage of the flow failed; the message names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        text = redact_text(str(cause).strip() or repr(cause))
        if len(text) > 4000:  # a Ray Train failure carries every worker's traceback: keep both ends
            text = text[:1500] + "\n...\n" + text[-2500:]
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {text}")
        self.stage = stage


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

    def log_table(self, run_id: str, table: dict[str, list], name: str, details: dict[str, Any]) -> None:
        """A results table as ``<name>.json`` (rows plus ``details``), ``.md``, ``.csv`` and an MLflow table."""
        client = self.client()
        rows = [dict(zip(table, row)) for row in zip(*table.values())]
        client.log_text(run_id, json.dumps({"results": rows, **details}, indent=2, default=str), f"{name}.json")
        client.log_text(run_id, markdown(table), f"{name}.md")
        client.log_text(run_id, csv_text(table), f"{name}.csv")
        client.log_table(run_id, data=table, artifact_file=f"{name}_table.json")

    def log_evaluations(self, run_id: str, training_run_id: str | None, results: list[dict[str, Any]],
                        preset: str) -> None:
        """The results table (results.json, .md, .csv and an MLflow table) and the errors as metrics of ``run_id``;
        the errors also go to the training run (as ``alexnet evaluate`` logs them)."""
        from mlflow.entities import Metric

        client = self.client()
        evaluations = {e["crops"]: e for e in results}
        table = imagenet_table(evaluations, preset=preset)
        now = int(time.time() * 1000)
        metrics = []
        for crops, e in evaluations.items():
            metrics += [Metric(f"val_top1_err_{crops}crop", e["top1_err"], now, 0),
                        Metric(f"val_top5_err_{crops}crop", e["top5_err"], now, 0)]
        client.log_batch(run_id, metrics=metrics)
        summaries = {c: {k: v for k, v in e.items() if k != "per_class"} for c, e in evaluations.items()}
        self.log_table(run_id, table, "results", {"evaluations": summaries, "paper_1cnn_10crop": PAPER_VAL_ERRORS})
        for e in evaluations.values():  # the per-class error table and the most confused pairs, as `alexnet evaluate`
            for name, columns in class_tables(e).items():
                client.log_table(run_id, data=columns, artifact_file=name)
        if training_run_id:
            try:
                client.log_batch(training_run_id, metrics=[
                    Metric(f"eval_val_{c}crop_{k}", e[k], now, int(e.get("epoch") or 0))
                    for c, e in evaluations.items() for k in ("top1_err", "top5_err")])
            except Exception:  # noqa: BLE001 - the training run may live in another store (a checkpoint from elsewhere)
                pass

    def adopt_training_run(self, training_run_id: str, tags: dict[str, str], *, cached: bool) -> None:
        """Make the training run this flow run's train child. ``run_training`` tags a run it creates itself; a run
        reopened from a checkpoint (training resumed after an interrupted flow run) is re-tagged here. A cached train
        stage gets a child run of its own pointing at the training run."""
        if cached:
            child = self.child("train", {"alexnet.cached": "true", "alexnet.training_run_id": training_run_id})
            child.end()
            return
        client = self.client()
        try:
            current = client.get_run(training_run_id).data.tags
        except Exception:  # noqa: BLE001 - a run in another store (tracking disabled, or a different URI)
            return
        for k, v in {**tags, "mlflow.parentRunId": self.run_id}.items():
            if current.get(k) != v:
                client.set_tag(training_run_id, k, v)


def ui_hint(tracking_uri: str) -> str:
    """How to open the MLflow UI on ``tracking_uri``."""
    from alexnet.tracking import DEFAULT_STORE, resolve_tracking_uri

    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    if tracking_uri == resolve_tracking_uri(DEFAULT_STORE):
        return "make mlflow-ui   (then http://127.0.0.1:5000)"
    return f"MLFLOW_TRACKING_URI={tracking_uri} make mlflow-ui   (then http://127.0.0.1:5000)"


class StageRunner:
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

    def timings(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.record.items()}
