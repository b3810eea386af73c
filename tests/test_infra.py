"""infra/: the Ray cluster config against Ray's own schema, the KubeRay RayJob, the Dockerfile, shell scripts,
systemd units and the compose file; and (slow) the one-machine stack started, checked and stopped for real."""

from __future__ import annotations

import configparser
import copy
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CLUSTER = INFRA / "ray" / "cluster-aws.yaml"
RAYJOB = INFRA / "ray" / "rayjob.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
STACK = INFRA / "local" / "stack.sh"


def _pinned(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


# --- Ray cluster launcher config -----------------------------------------------------------------------------------


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _validate_like_ray_up(config: dict) -> dict:
    """What `ray up` does before it talks to AWS: merge the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_config_validates_against_ray_schema():
    import jsonschema
    import ray.autoscaler

    config = _cluster()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written, before Ray fills in defaults
    prepared = _validate_like_ray_up(config)

    nodes = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    assert prepared["head_node_type"] in nodes
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) > 0]
    assert gpu, "no GPU worker type"
    for node in gpu:
        assert node["min_workers"] == 0 and node["max_workers"] >= 1
        assert node["resources"]["GPU"] * node["max_workers"] >= 8, "cannot reach the paper preset's 8 GPUs"
    assert sum(n.get("min_workers", 0) for n in nodes.values()) <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0
    for name, node in nodes.items():
        assert "Arn" in node["node_config"].get("IamInstanceProfile", {}), f"{name}: no IAM instance profile for S3"
    assert prepared["docker"]["image"]
    # Ray's defaults would pip-install a nightly Ray wheel; the image already has the pinned one.
    commands = " ".join(prepared["setup_commands"] + prepared["head_setup_commands"])
    assert "ray-wheels" not in commands and "pip install" not in commands
    # Token auth: every node gets the token and starts Ray in token mode.
    assert any(remote.endswith("/.ray/auth_token") for remote in prepared["file_mounts"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(prepared[key])
    text = CLUSTER.read_text()
    assert "python -m alexnet.train --config configs/paper.yaml --data s3://" in text
    assert "ray up" in text and "ray job submit" in text


def _set(config: dict, path: str, value) -> dict:
    node = config
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return config


@pytest.mark.parametrize(
    "path, value",
    [
        ("gpu_cores", 8),  # unknown top-level key (additionalProperties: false)
        ("available_node_types.gpu_worker.resources.GPU", "8"),  # resources are integers
        ("available_node_types.gpu_worker.min_workers", "0"),
        ("docker.gpus", "all"),  # unknown docker option
        ("head_node_type", "no_such_type"),
        ("available_node_types.gpu_worker.min_workers", 7),  # more than the global max_workers
    ],
)
def test_broken_cluster_config_is_rejected(path, value):
    import jsonschema

    broken = _set(_cluster(), path, value)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_like_ray_up(broken)


def test_cluster_config_without_node_config_is_rejected():
    import jsonschema

    broken = _cluster()
    del broken["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        _validate_like_ray_up(broken)


# --- KubeRay RayJob ------------------------------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def test_rayjob_manifest_structure():
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m alexnet.train --config configs/paper.yaml --data s3://")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pinned("ray")
    assert cluster["authOptions"]["mode"] == "token"

    head = cluster["headGroupSpec"]
    assert _containers(head) and all(_gpus(c) == 0 for c in _containers(head))
    workers = cluster["workerGroupSpecs"]
    total = sum(g["replicas"] * sum(_gpus(c) for c in _containers(g)) for g in workers)
    assert total == 8, f"worker groups hold {total} GPUs, the paper preset uses 8"
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    for group in [head, *workers]:
        for c in _containers(group):
            assert c["image"] and c["resources"]["requests"] and c["resources"]["limits"]
            env = {e["name"]: e for e in c["env"]}
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[key]["valueFrom"]["secretKeyRef"]["name"], f"{key} must come from a Secret"
    text = RAYJOB.read_text()
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN" in text


# --- Dockerfile ----------------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        word, _, rest = current.strip().partition(" ")
        lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


def test_dockerfile_builds_from_existing_files():
    instructions = _instructions(DOCKERFILE)
    args = {k: v for k, v in (a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)}
    base = args["BASE_IMAGE"]
    assert base == f"rayproject/ray:{_pinned('ray')}-py311-gpu", "the base image must match the pinned Ray"
    copied = []
    for word, rest in instructions:
        if word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            copied += parts[:-1]
    for source in copied:
        assert source == "." or (ROOT / source).exists(), f"COPY {source}: not in the repository"
    for needed in ("pyproject.toml", "constraints.txt", "scripts/install_pillow_simd.sh"):
        assert needed in copied
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "scripts/install_pillow_simd.sh" in runs
    assert re.search(r"pip install .*-c constraints\.txt .*\.(\s|$)", runs), "the project is installed with the constraints"
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert instructions[-1] == ("CMD", '["python", "-m", "alexnet.train", "--help"]')

    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    for local_state in (".venv", "runs", ".git"):
        assert local_state in ignore


# --- shell scripts, systemd units, compose -------------------------------------------------------------------------


SHELL_SCRIPTS = sorted(INFRA.rglob("*.sh"))


def test_every_infra_shell_script_is_found():
    assert {p.relative_to(INFRA).as_posix() for p in SHELL_SCRIPTS} >= {"local/stack.sh", "mlflow/server.sh"}


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_shell_script_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
def test_shell_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "-x", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not shutil.which("hadolint"), reason="hadolint not installed")
def test_dockerfiles_pass_hadolint():
    dockerfiles = [DOCKERFILE, INFRA / "mlflow" / "Dockerfile"]
    result = subprocess.run(["hadolint", *map(str, dockerfiles)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


UNITS = sorted((INFRA / "prefect" / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_parses(unit, tmp_path):
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(unit.read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    exec_start = parser["Service"]["ExecStart"]
    assert exec_start.startswith("/") and "prefect" in exec_start
    assert parser["Service"]["User"] not in ("root", "0")
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze"):
        # systemd's own parser; it also wants the binaries, so point /opt/alexnet at this checkout.
        if not (ROOT / ".venv" / "bin" / "prefect").exists():
            pytest.skip("no .venv/bin/prefect for systemd-analyze verify")
        copy_ = tmp_path / unit.name
        copy_.write_text(unit.read_text().replace("/opt/alexnet", str(ROOT)))
        result = subprocess.run(["systemd-analyze", "verify", str(copy_)], capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_prefect_units_cover_server_and_worker():
    assert {u.name for u in UNITS} == {"prefect-server.service", "prefect-worker.service"}
    worker = (INFRA / "prefect" / "systemd" / "prefect-worker.service").read_text()
    assert "--pool alexnet-pool" in worker and "--type process" in worker
    readme = (INFRA / "prefect" / "README.md").read_text()
    for text in ("prefect server start", "prefect work-pool create alexnet-pool --type process",
                 "prefect worker start --pool alexnet-pool", "PREFECT_API_DATABASE_CONNECTION_URL"):
        assert text in readme


def test_mlflow_compose_parses():
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"mlflow", "postgres"} <= set(services)
    mlflow = services["mlflow"]
    command = " ".join(mlflow["command"])
    assert command.startswith("mlflow server") and "--artifacts-destination" in command and "--host 0.0.0.0" in command
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "MLFLOW_S3_ENDPOINT_URL" in mlflow["environment"]
    assert (INFRA / "mlflow" / mlflow["build"]["context"] / mlflow["build"]["dockerfile"]).exists()
    assert services["postgres"]["healthcheck"] and mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


# --- the one-machine stack -----------------------------------------------------------------------------------------


def _stack_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "PREFECT_", "MLFLOW_", "STACK_"))}
    env.update(extra)
    return env


def test_stack_script_usage(tmp_path):
    help_ = subprocess.run(["bash", str(STACK), "--help"], capture_output=True, text=True, timeout=30)
    assert help_.returncode == 0 and "start|stop|status" in help_.stdout
    bad = subprocess.run(["bash", str(STACK), "launch"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "expected start, stop or status" in bad.stderr
    status = subprocess.run(["bash", str(STACK), "status", "--dir", str(tmp_path / "stack")],
                            capture_output=True, text=True, timeout=60, env=_stack_env())
    assert status.returncode != 0
    for service in ("prefect-server", "prefect-worker", "mlflow", "ray-head"):
        assert f"{service}: stopped" in status.stdout


def _http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _port_free(port: int) -> bool:
    """Nothing listens there (SO_REUSEADDR: the health checks' TIME_WAIT connections do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_stack_start_status_stop(tmp_path):
    """The real stack on loopback: start waits for every health check, status reports them, stop ends them.

    Free ports and a private Ray temp dir and token file keep it apart from anything else on the machine
    (no `ray stop`, nothing written to ~/.ray). About a minute on 2 cores."""
    if not all((ROOT / ".venv" / "bin" / tool).exists() for tool in ("prefect", "mlflow", "ray")):
        pytest.skip("needs .venv with prefect, mlflow and ray (make setup)")
    stack_dir = tmp_path / "stack"
    ray_tmp = Path(tempfile.mkdtemp(prefix="alexnet-ray-test-", dir="/tmp"))  # short: Ray's socket paths live here
    token_file = tmp_path / "ray_auth_token"
    prefect, worker, mlflow_port, gcs, dashboard, client, agent = free_ports(7)
    env = _stack_env(
        STACK_PREFECT_PORT=str(prefect), STACK_WORKER_HEALTH_PORT=str(worker), STACK_MLFLOW_PORT=str(mlflow_port),
        STACK_RAY_PORT=str(gcs), STACK_RAY_DASHBOARD_PORT=str(dashboard), STACK_RAY_CLIENT_PORT=str(client),
        STACK_RAY_AGENT_PORT=str(agent), STACK_RAY_TEMP_DIR=str(ray_tmp), RAY_AUTH_TOKEN_PATH=str(token_file),
        STACK_RAY_ARGS="--num-cpus=1 --object-store-memory=100000000", STACK_TIMEOUT="150",
    )

    def stack(action: str, timeout: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(STACK), action, "--dir", str(stack_dir)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)

    services = ("prefect-server", "prefect-worker", "mlflow", "ray-head")
    pids: dict[str, int] = {}
    try:
        started = stack("start", 240)
        assert started.returncode == 0, started.stdout + started.stderr
        for service in services:
            assert re.search(rf"{service}: healthy after \d+ s", started.stdout), started.stdout
            assert (stack_dir / f"{service}.pid").exists() and (stack_dir / f"{service}.log").exists()
        assert (stack_dir / "prefect").is_dir(), "PREFECT_HOME is not isolated under --dir"
        assert "RAY_AUTH_MODE=token" in started.stdout

        status = stack("status", 60)
        assert status.returncode == 0, status.stdout + status.stderr
        for service in services:
            assert f"{service}: healthy" in status.stdout
        assert "token auth on" in status.stdout

        # Each service answers on loopback; the Ray dashboard refuses requests without the token.
        token = token_file.read_text().strip()
        assert _http_status(f"http://127.0.0.1:{prefect}/api/health") == 200
        assert _http_status(f"http://127.0.0.1:{mlflow_port}/health") == 200
        assert _http_status(f"http://127.0.0.1:{worker}/health") == 200
        assert _http_status(f"http://127.0.0.1:{dashboard}/api/version") == 401
        assert _http_status(f"http://127.0.0.1:{dashboard}/api/version", token) == 200

        pids = {s: int((stack_dir / f"{s}.pid").read_text()) for s in services}
    finally:
        stopped = stack("stop", 180)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for service, pid in pids.items():
        assert f"{service}: stopped" in stopped.stdout
        assert not _alive(pid), f"{service} (pid {pid}) still running after stop"
    for port in (prefect, worker, mlflow_port, gcs, dashboard):
        assert _port_free(port), f"port {port} still in use after stop"
    after = stack("status", 60)
    assert after.returncode != 0 and all(f"{s}: stopped" in after.stdout for s in services)
