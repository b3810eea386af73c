"""Where a stage runs: :func:`run_stage` calls one library function (``"module:function"``) on JSON-able keyword
arguments and returns its JSON-able result, either in this process or as a Ray job on a cluster.

Locally (no address, or ``local``, Ray's name for a local instance) the function is imported and called here. On
a cluster it becomes a Ray job with the repository as its ``working_dir`` and the entrypoint
``<python> -m flows.job module:function <base64 JSON kwargs>`` (``flows/job.py``): the kwargs travel as one
base64 token, so no value is ever re-quoted or re-parsed as a command-line flag, and the job prints its result as
one marked line (``ALEXNET_RESULT <base64 JSON>``) last, which :func:`job_result` finds by its marker, whatever
the function printed before. The job's logs stream into the task's log; a failed or stopped job raises
:class:`RayJobError` with the tail of its logs.

**The interpreter.** A job's entrypoint is a shell command on the cluster, run with the ``PATH`` that
``ray start`` had, which is not the venv's when the head was started as ``.venv/bin/ray start --head`` without
activating it. So the entrypoint names its interpreter: ``ALEXNET_RAY_JOB_PYTHON`` when set, else this
process's ``sys.executable`` when the cluster has an executable at that path (one machine, a shared file system,
or nodes built like this one), else ``python`` from the cluster's ``PATH`` (a container image).

Nothing here imports torch or Ray at import time.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pipelines.redact import has_secret, redact_text
from pipelines.rayutil import cluster_address

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Left out of the Ray jobs' ``working_dir`` on top of ``.gitignore`` (which Ray applies itself).
RAY_JOB_EXCLUDES = [".git", ".venv", "runs", "mlruns", "mlflow.db", "data", ".bench", "test-artifacts", ".pytest_cache",
                    "__pycache__"]

#: The first word of the line ``flows.job`` prints last: the function's result, base64 JSON.
RESULT_MARKER = "ALEXNET_RESULT"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its log prefixes


class RayJobError(RuntimeError):
    """A Ray job of a stage ended FAILED or STOPPED; the message holds the job's message and the tail of its logs."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# --- the JSON contract between the flow and flows.job -----------------------------------------------------------------


def encode(value: Any) -> str:
    """``value`` as one shell-safe token: base64 (URL-safe alphabet) of its JSON."""
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()


def decode(token: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(token.encode()))


def resolve(fn: str):
    """The function named ``"package.module:function"``."""
    module, sep, name = fn.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"a stage function is named 'module:function' (e.g. flows.stages:train), not {fn!r}")
    target = getattr(importlib.import_module(module), name, None)
    if not callable(target):
        raise ValueError(f"{fn}: {module} has no function {name!r}")
    return target


def call(fn: str, kwargs: dict[str, Any]) -> Any:
    """Import and call ``fn`` with ``kwargs``, its result made plain JSON (what a job would return)."""
    return json.loads(json.dumps(resolve(fn)(**kwargs), default=str))


def result_line(result: Any) -> str:
    return f"{RESULT_MARKER} {encode(result)}"


def job_result(logs: str) -> Any:
    """The result a ``flows.job`` run printed: the last line starting with :data:`RESULT_MARKER`."""
    for line in reversed(_ANSI.sub("", logs).splitlines()):
        word, _, token = line.strip().partition(" ")
        if word == RESULT_MARKER and token:
            return decode(token.strip())
    raise ValueError(f"no {RESULT_MARKER} line in the job's output: did it run `python -m flows.job`?")


def _leaves(value: Any, name: str):
    """``(name, text)`` for every scalar in a JSON-able value: what a secret check looks at."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{name}.{k}" if name else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{name}[{i}]")
    elif value is not None:
        yield name, str(value)


# --- Ray jobs --------------------------------------------------------------------------------------------------------


def job_client(address: str):
    """A ``JobSubmissionClient`` for ``address`` (dashboard URL, GCS address or ray://). Ray lets ``RAY_ADDRESS``
    override an explicit address; here the explicit one wins. Token auth comes from ``RAY_AUTH_MODE=token`` and
    ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``."""
    from ray.job_submission import JobSubmissionClient

    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address)
    finally:
        os.environ.update(saved)


def job_env(tracking_uri: str | None) -> dict[str, str]:
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


def job_python() -> str:
    """The entrypoint's interpreter, as a shell word resolved on the cluster (see the module's docstring)."""
    explicit = os.environ.get("ALEXNET_RAY_JOB_PYTHON")
    if explicit:
        return shlex.quote(explicit)
    here = shlex.quote(sys.executable)
    return f'"$(test -x {here} && echo {here} || echo python)"'


def _logger():
    """The task's Prefect logger; a plain one outside a run (a job run by hand)."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return flow_run.id or ""


def run_ray_job(address: str, stage: str, argv: list[str], *, env: dict[str, str] | None = None,
                entrypoint_num_cpus: float = 0, entrypoint_num_gpus: float = 0, poll_s: float = 2.0) -> str:
    """Run ``<python> ARGV...`` as a Ray job on the cluster at ``address`` with the repository as its working dir
    (``<python>``: :func:`job_python`); stream its logs into the task's log; return the full logs, or raise
    :class:`RayJobError` with their tail. Interrupting this (a cancelled flow run) stops the job."""
    from ray.job_submission import JobStatus

    refuse_secrets_in_jobs({f"argument {i + 1}": a for i, a in enumerate(argv)} | {f"env {k}": v
                                                                                  for k, v in (env or {}).items()})
    logger = _logger()
    client = job_client(address)
    entrypoint = f"{job_python()} {shlex.join(argv)}"
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"alexnet-{stage}-{uuid.uuid4().hex[:12]}",
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": RAY_JOB_EXCLUDES, "env_vars": env or {}},
        metadata={"alexnet_stage": stage, "prefect_flow_run_id": _flow_run_id()},
        entrypoint_num_cpus=entrypoint_num_cpus or None,
        entrypoint_num_gpus=entrypoint_num_gpus or None,
    )
    logger.info("%s: submitted Ray job %s to %s: %s", stage, job_id, address, entrypoint[:300])
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
            if not line.startswith(RESULT_MARKER):  # the result is returned, not logged
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
        raise RayJobError(f"Ray job {job_id} ({entrypoint[:300]}) ended {status.value}: {info.message or ''}\n"
                          f"last lines of its logs:\n{last}",
                          transient=status == JobStatus.FAILED and exit_code is None)
    logger.info("%s: Ray job %s succeeded in %.0f s", stage, job_id, time.monotonic() - started)
    return logs


def run_stage(fn: str, kwargs: dict[str, Any], *, ray_address: str | None, env: dict[str, str] | None = None,
              stage: str | None = None, cpus: float = 0, gpus: float = 0) -> Any:
    """Call the library function ``fn`` (``"module:function"``) with the JSON-able ``kwargs`` and return its
    JSON-able result: here when ``ray_address`` is empty or ``local``, else as a Ray job on that cluster
    (``python -m flows.job``; ``cpus``/``gpus``: the job's entrypoint resources) whose environment is ``env``.
    ``stage`` names the job (its id and metadata); default: the function's name."""
    address = cluster_address(ray_address)
    if not address:
        return call(fn, kwargs)
    refuse_secrets_in_jobs(dict(_leaves(kwargs, "")) | {f"env {k}": v for k, v in (env or {}).items()})
    logs = run_ray_job(address, stage or fn.rpartition(":")[2], ["-m", "flows.job", fn, encode(kwargs)], env=env,
                       entrypoint_num_cpus=cpus, entrypoint_num_gpus=gpus)
    return job_result(logs)
