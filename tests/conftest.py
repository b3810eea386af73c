"""Shared fixtures: a local Ray, synthetic ImageNets in the three layouts, and an S3 server on loopback."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
