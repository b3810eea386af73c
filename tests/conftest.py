"""Shared fixtures: a local Ray, synthetic ImageNets in the three layouts, an S3 server on loopback, a
token-authenticated Ray head started the README's way; and the helpers that start, wait for and stop servers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The folder of this interpreter's scripts (``prefect``, ``ray``, ``mlflow``): the venv's under ``make test``.
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The synthetic ImageNet used by the ingest/prepare/stats tests (small: every layout is prepared several times).
SYNTH = dict(classes=4, train_per_class=12, val_per_class=4, size=200, seed=0)
#: The synthetic set holds 2 undecodable train files and 1 undecodable val file out of 64.
SYNTH_BAD_FRACTION = 0.1


@pytest.fixture(scope="session", autouse=True)
def node_s3_credentials():
    """The loopback S3 server's dummy keys in the environment of every Ray started by the tests: Ray workers get
    no credentials from the driver (``storage.worker_env`` passes endpoints only), they find them on their node, as
    on a cluster. Set before any Ray starts, so that its workers inherit them."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


#: The session folder of the Ray that ``ray_local`` started (its logs are under ``logs/``) and its dashboard URL.
RAY_SESSION: dict[str, str] = {}


@pytest.fixture(scope="session")
def ray_local():
    """The local Ray the pipeline starts (``pipelines.rayutil.init_local``: dashboard and state API on 127.0.0.1),
    on 2 CPUs, its logs kept out of the test output."""
    import ray

    from pipelines.rayutil import init_local

    if not ray.is_initialized():
        context = init_local(num_cpus=2, log_to_driver=False)
        RAY_SESSION["dir"] = context.address_info["session_dir"]
        RAY_SESSION["dashboard"] = f"http://{context.dashboard_url}"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_local_session(ray_local) -> dict[str, str]:
    """``dir`` (the session folder, logs under ``logs/``) and ``dashboard`` (URL) of the Ray ``ray_local`` started;
    empty when it found Ray already running. (A fixture: tests importing ``tests.conftest`` get another module.)"""
    return RAY_SESSION


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The same synthetic ImageNet written in each layout: <root>/{official,kaggle,imagefolder}."""
    from pipelines.synth import write_synthetic_imagenet

    root = tmp_path_factory.mktemp("synth-imagenet")
    for layout in ("official", "kaggle", "imagefolder"):
        write_synthetic_imagenet(root / layout, layout=layout, **SYNTH)
    return root


def free_ports(n: int) -> list[int]:
    """Distinct free loopback ports above Ray's default worker port range (10002-19999)."""
    ports: set[int] = set()
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 20000:
            ports.add(port)
    return sorted(ports)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback; AWS_* variables point at it for the whole session."""
    from moto.server import ThreadedMotoServer

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def upload_tree(local: Path, bucket: str, prefix: str) -> str:
    """Copy a local folder to s3://bucket/prefix (creating the bucket); returns the URI."""
    import boto3

    s3 = boto3.client("s3")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def prepared(synth_root, ray_local, tmp_path_factory) -> Path:
    """The official-layout synthetic ImageNet, prepared (small shards so that splits have several)."""
    from pipelines.prepare import prepare_imagenet

    out = tmp_path_factory.mktemp("prepared") / "imagenet"
    prepare_imagenet(str(synth_root / "official"), str(out), shard_rows=16, max_bad_fraction=SYNTH_BAD_FRACTION)
    return out


@pytest.fixture(scope="session")
def train_data(ray_local, tmp_path_factory) -> str:
    """A 10-class synthetic ImageNet, prepared, with statistics (training and transfer tests)."""
    from pipelines.prepare import prepare_imagenet
    from pipelines.stats import compute_stats
    from pipelines.synth import write_synthetic_imagenet

    root = tmp_path_factory.mktemp("train-data")
    write_synthetic_imagenet(root / "src", classes=10, train_per_class=40, val_per_class=10, size=200, seed=3)
    prepare_imagenet(str(root / "src"), str(root / "prepared"), shard_rows=100)
    compute_stats(str(root / "prepared"))
    return str(root / "prepared")


@pytest.fixture(scope="session")
def reader_shards(ray_local, tmp_path_factory) -> dict[str, str]:
    """The same synthetic ImageNet prepared as JPEG and as raw shards of 10 rows (train 5 shards, val 2): the
    shard reader's tests and the GPU-input benchmark's CPU run read it (sizes: ``tests/test_data.py`` SIZES)."""
    from pipelines import prepare
    from pipelines.imaging import ImageRecipe
    from pipelines.synth import write_synthetic_imagenet

    root = tmp_path_factory.mktemp("data-reader")
    write_synthetic_imagenet(root / "src", classes=4, train_per_class=12, val_per_class=4, size=160, quirks=False)
    out = {}
    for fmt in ("jpeg", "raw"):
        out[fmt] = str(root / fmt)
        prepare.prepare_imagenet(str(root / "src"), out[fmt], shard_rows=10, recipe=ImageRecipe(image_format=fmt))
    return out


@pytest.fixture(scope="session")
def trained_imagenet(train_data, tmp_path_factory) -> dict:
    """The smoke preset trained 3 epochs by 2 Ray Train workers on ``train_data`` (run ``learn``): the
    training tests check it learned and logged; the transfer tests transfer from its checkpoint."""
    from alexnet.config import load_config
    from alexnet.train import run_training

    tmp = tmp_path_factory.mktemp("trained")
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"data.data={train_data}", f"train.storage_path={tmp / 'ray'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "train.epochs=3", "train.run_name=learn"])
    return {"result": run_training(cfg), "tmp": tmp}


# --- processes: servers, workers and heads started by the tests ------------------------------------------------------


def isolated_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment without Prefect, Ray and MLflow settings, with a private PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_", "MLFLOW_"))}
    (tmp / "prefect-home").mkdir(parents=True, exist_ok=True)
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_process(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``cmd`` in the repository root, in its own session (process group), its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM the process group (the process first, so it can shut its children down), then SIGKILL."""
    if proc is None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if pgid is not None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)


def wait_http(url: str, timeout: float, *, proc: subprocess.Popen, log: Path, token: str | None = None,
              expect: bytes | None = None) -> None:
    """Until ``url`` answers (with ``expect``, when given); fails with the log's tail when ``proc`` exits first."""
    deadline = time.time() + timeout
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            body = urllib.request.urlopen(request, timeout=5).read()
            if expect is None or body.strip() == expect:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def run_checked(cmd: list[str], env: dict[str, str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``cmd`` in the repository root; fails with the output's tail unless it exits 0."""
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert out.returncode == 0, f"{cmd[:4]} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


def mlflow_children(tracking_uri: str, parent_run_id: str) -> dict[str, object]:
    """The parent run and its child runs by ``alexnet.stage`` (or run name)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {"parent": parent, **{r.data.tags.get("alexnet.stage", r.info.run_name): r for r in children}}


# --- README blocks -----------------------------------------------------------------------------------------------------


def readme_blocks(heading: str) -> list[str]:
    """The ```bash blocks of one README section, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    end = text.find("\n### ", start + len(heading))
    section = text[start:end if end > 0 else None]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [block.replace("\\\n", " ") for block in blocks]


def block_commands(block: str) -> list[str]:
    """A block's commands, comments dropped."""
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# --- a token-authenticated Ray head, started as README Tier 2 says ---------------------------------------------------


@pytest.fixture(scope="session")
def token_head(tmp_path_factory):
    """README Tier 2's head block run as written, from the repository root, in a shell whose ``PATH`` lacks the
    venv (so jobs that work on it do not depend on an activated venv), with a private ``HOME`` (the token file),
    ``RAY_TMPDIR`` and free ports; 2 CPUs. Only the ``ray start --head`` line gets options appended: ports, temp
    dir, ``--block``, resources. Shared by the README test (tests/test_infra.py) and the flow's Ray-jobs test
    (tests/test_flow.py): one head start for both. Yields its addresses, token, ``HOME`` and the head's
    environment."""
    if not (ROOT / ".venv" / "bin" / "ray").exists():
        pytest.skip("needs .venv (make setup)")
    tmp = tmp_path_factory.mktemp("token-head")
    home = tmp / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="alexnet-th-", dir="/tmp"))  # short: Ray's socket paths live here
    head_cmds = block_commands(readme_blocks("### Tier 2")[0])
    starts = [c for c in head_cmds if "ray start --head" in c]
    assert len(starts) == 1, head_cmds
    gcs, dashboard, client, agent = free_ports(4)
    system_path = ":".join(p for p in os.environ.get("PATH", "/usr/bin:/bin").split(":")
                           if not p.startswith(str(ROOT / ".venv")) and p != str(BIN))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV", "MLFLOW_", "AWS_"))}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), PATH=system_path,
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
               # The machine's memory is shared with other test runs: Ray's OOM monitor would kill this head's
               # tiny workers for memory that other processes use.
               RAY_memory_monitor_refresh_ms="0")
    local_start = (f"{starts[0]} --block --node-ip-address=127.0.0.1 --port={gcs} --dashboard-port={dashboard} "
                   f"--ray-client-server-port={client} --dashboard-agent-listen-port={agent} "
                   f"--temp-dir={ray_tmp} --num-cpus=2 --object-store-memory=150000000")
    script = "set -e\n" + "\n".join(local_start if c == starts[0] else c for c in head_cmds) + "\n"
    log = tmp / "head.log"
    head = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        token_file = home / ".ray" / "auth_token"
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, log.read_text()[-3000:]
            try:
                if token_file.exists() and http_status(f"{address}/api/version",
                                                       token_file.read_text().strip()) == 200:
                    break
            except urllib.error.URLError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "the head did not answer: " + log.read_text()[-3000:]
            time.sleep(1)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "dashboard_port": dashboard,
               "token": token_file.read_text().strip(), "home": home, "system_path": system_path, "env": env,
               "head_cmds": head_cmds, "log": log}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
