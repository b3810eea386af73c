"""Connecting to Ray: the cluster named by an address or ``RAY_ADDRESS``, else a local instance."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; later calls are no-ops.

    ``address`` (or ``RAY_ADDRESS``) connects to a running cluster; without one a local Ray starts with the
    machine's CPUs (or ``num_cpus``). The dashboard is off locally: the pipeline needs no web UI to run.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def cpu_concurrency(tasks: int | None = None, *, cpus_per_task: float = 1.0) -> int:
    """How many CPU tasks can run at once on the cluster (capped at ``tasks``).

    Ray Data's default resource budgeting keeps a share of a small cluster's CPUs in reserve (on 2 CPUs it ran
    one task at a time, measured in docs/benchmarks.md); CPU-bound stages therefore ask for all CPUs.
    """
    import ray

    n = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))
    return max(1, min(n, tasks)) if tasks else n
