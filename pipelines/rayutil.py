"""Connecting to Ray: the cluster named by an address or ``RAY_ADDRESS``, else a fresh local instance.

Addresses mean what they mean to Ray: ``local`` (or nothing) starts a local instance, ``auto`` attaches to the
cluster that ``ray start`` recorded on this machine (``$RAY_TMPDIR/ray/ray_current_cluster``), anything else names a
cluster. Without an address the pipeline never attaches to a recorded cluster: after a crashed ``ray start`` that
record names a dead address, and every command would fail on it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: Values of ``--ray-address`` / ``RAY_ADDRESS`` that mean "start a local instance" (as in ``ray.init``).
LOCAL_ADDRESSES = ("", "local")
#: The help of every ``--ray-address`` option.
ADDRESS_HELP = ("Ray cluster to run on: its address, 'auto' (the cluster `ray start` recorded on this machine) or "
                "'local' (a fresh local instance); default RAY_ADDRESS, else local")
#: Where Ray's state API and job clients look for the dashboard before anything else.
API_SERVER_VARIABLE = "RAY_API_SERVER_ADDRESS"


class ResourceError(RuntimeError):
    """A resource request that this Ray cluster can never meet (it cannot add nodes)."""


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster to use: ``address``, else ``RAY_ADDRESS``; None for a local instance (``local`` or empty)."""
    value = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    return None if value in LOCAL_ADDRESSES else value


def init_local(num_cpus: int | None = None, **options):
    """Start a fresh local Ray instance (never an existing cluster) and return ``ray.init``'s context.

    Its dashboard runs on 127.0.0.1, because it serves the state API that Ray Train's placement-group cleaner polls
    (without it the cleaner logs a warning every second and could never see a dead controller). The cleaner runs in
    a Ray worker, where the state API client has no address to go by (workers of a local instance get no
    ``RAY_ADDRESS``): it takes whatever Ray it finds on the machine, and its thread dies when it finds several. So
    the dashboard gets a free port chosen here, and Ray's own processes, and through them every worker, start with
    its URL in ``RAY_API_SERVER_ADDRESS``, the variable that client reads first; this process's environment is
    left as it was.
    """
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = os.environ.get(API_SERVER_VARIABLE)
    os.environ[API_SERVER_VARIABLE] = f"http://127.0.0.1:{port}"
    try:
        return ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                        dashboard_port=port, **options)
    finally:
        if saved is None:
            os.environ.pop(API_SERVER_VARIABLE, None)
        else:
            os.environ[API_SERVER_VARIABLE] = saved


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; later calls are no-ops.

    ``address`` (or ``RAY_ADDRESS``) connects to a running cluster (``auto``: the one recorded by ``ray start`` on
    this machine); without one, or with ``local``, a local instance starts with the machine's CPUs (or
    ``num_cpus``).
    """
    import ray

    if ray.is_initialized():
        return
    cluster = cluster_address(address)
    if cluster:
        log.info("connecting to Ray at %s", cluster)
        ray.init(address=cluster, log_to_driver=True)
    else:
        init_local(num_cpus, log_to_driver=True)


def cpu_concurrency(tasks: int | None = None, *, cpus_per_task: float = 1.0) -> int:
    """How many CPU tasks can run at once on the cluster (capped at ``tasks``).

    Ray Data's default resource budgeting keeps a share of a small cluster's CPUs in reserve (on 2 CPUs it ran
    one task at a time, measured in docs/benchmarks.md); CPU-bound stages therefore ask for all CPUs.
    """
    import ray

    n = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))
    return max(1, min(n, tasks)) if tasks else n


def can_add_nodes() -> bool:
    """Whether the connected cluster may grow: False when Ray's autoscaler knows only node types made up from the
    running nodes (``node_<id>``: what it reports without an autoscaling config, as for a local instance or a
    ``ray start`` by hand) and nothing is launching; True when it cannot tell (e.g. over Ray Client)."""
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - no status (Ray Client, older GCS): assume an autoscaler may help
        return True
    if status.pending_launches or status.pending_nodes:
        return True
    return not all(n.ray_node_type_name == f"node_{n.node_id}" for n in status.active_nodes + status.idle_nodes)


def _describe(resources: dict) -> str:
    return f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"


def _node_resources(address: str | None) -> list[dict]:
    """The total resources of each alive node: of the Ray this process is connected to, or (``address``, a
    dashboard URL as Ray jobs are submitted to) through the state API."""
    import ray

    if address is None:
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    from ray.util.state import list_nodes

    return [dict(n.resources_total) for n in list_nodes(address=address, filters=[("state", "=", "ALIVE")])]


def check_resources(section: str, *, num_workers: int, cpus_per_worker: float, use_gpu: bool,
                    can_grow: bool | None = None, address: str | None = None) -> None:
    """Fail fast when ``num_workers`` workers of ``cpus_per_worker`` CPUs (and one GPU each with ``use_gpu``) do not
    fit on the cluster's nodes and the cluster cannot grow; on a cluster that can, log that the run waits for
    nodes. ``section`` names the config keys in the message (``train``, ``transfer``). Ray would otherwise wait
    forever, logging "No available node types can fulfill resource request" every few seconds.

    ``address`` checks a cluster this process is not connected to (the flow's Ray jobs) through its dashboard;
    whether that one can grow is not known from outside, so there the wait is logged, not refused."""
    need = {"CPU": float(cpus_per_worker)} | ({"GPU": 1.0} if use_gpu else {})
    if address is not None:
        can_grow = True if can_grow is None else can_grow
        try:
            nodes = _node_resources(address)
        except Exception as e:  # noqa: BLE001 - a check must not break a run the cluster may well be able to do
            log.info("could not read the resources of the Ray cluster at %s (%s); not checked", address, e)
            return
    else:
        nodes = _node_resources(None)

    def room(node: dict) -> int:  # workers that fit on one node (a worker's resources are never split)
        counts = [int(node.get(k, 0) // v) for k, v in need.items() if v > 0]
        return min(counts) if counts else num_workers

    fits = sum(room(r) for r in nodes)
    if fits >= num_workers:
        return
    total = {k: sum(r.get(k, 0) for r in nodes) for k in ("CPU", "GPU")}
    largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    asked = (f"{section}.num_workers={num_workers} workers of {section}.cpus_per_worker={cpus_per_worker:g} CPUs"
             f"{' and 1 GPU' if use_gpu else ''} ({section}.use_gpu={str(use_gpu).lower()})")
    has = (f"the Ray cluster has {len(nodes)} node{'s' if len(nodes) != 1 else ''} with {_describe(total)} in all "
           f"(largest node: {_describe(largest)}), room for {fits} such worker{'s' if fits != 1 else ''}")
    if can_grow if can_grow is not None else can_add_nodes():
        log.warning("%s do not fit yet: %s; waiting for the autoscaler to add nodes (if it cannot, stop and change "
                    "%s.use_gpu, %s.cpus_per_worker or %s.num_workers)", asked, has, section, section, section)
        return
    raise ResourceError(f"{asked} cannot run: {has}, and it cannot add nodes. Change {section}.use_gpu, "
                        f"{section}.cpus_per_worker or {section}.num_workers (--set {section}.KEY=VALUE)")
