"""Which Ray the pipeline uses (``local`` / empty = a fresh local instance, as Ray means it) and the check that a
resource request fits a cluster that cannot grow (``pipelines.rayutil``)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipelines.rayutil import ResourceError, can_add_nodes, check_resources, cluster_address

ROOT = Path(__file__).resolve().parents[1]


def test_local_and_empty_addresses_mean_a_local_instance(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None and cluster_address("") is None and cluster_address("local") is None
    assert cluster_address("auto") == "auto" and cluster_address("ray://head:10001") == "ray://head:10001"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", " ")
    assert cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert cluster_address(None) == "http://head:8265" and cluster_address("local") is None


@pytest.mark.slow
def test_a_stale_ray_current_cluster_record_does_not_capture_a_call_without_address():
    """After a crashed ``ray start`` the record names a dead address; without an address a fresh local instance
    starts instead of failing with "Failed to connect to Ray cluster" (``--ray-address auto`` still attaches)."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live below it
    try:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
        code = ("import ray; from pipelines.rayutil import ensure_ray; ensure_ray(); "
                "print('cpus', ray.cluster_resources()['CPU']); ray.shutdown()")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "cpus " in out.stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_request_the_local_ray_cannot_meet_fails_at_once_naming_the_keys(ray_local, ray_local_session, caplog):
    assert can_add_nodes() is False  # a local instance has no autoscaling config
    check_resources("train", num_workers=2, cpus_per_worker=1, use_gpu=False)  # fits the 2 CPUs
    with pytest.raises(ResourceError) as e:
        check_resources("train", num_workers=1, cpus_per_worker=8, use_gpu=True)
    message = str(e.value)
    assert "\n" not in message
    for key in ("train.use_gpu=true", "train.cpus_per_worker=8", "train.num_workers=1", "2 CPUs, 0 GPUs",
                "room for 0 such workers"):
        assert key in message, message
    with pytest.raises(ResourceError, match="transfer.num_workers=3 .*room for 2 such workers"):
        check_resources("transfer", num_workers=3, cpus_per_worker=1, use_gpu=False)
    with caplog.at_level(logging.WARNING, logger="pipelines.rayutil"):  # a cluster that can grow: the run waits
        check_resources("train", num_workers=1, cpus_per_worker=8, use_gpu=True, can_grow=True)
    assert "waiting for the autoscaler" in caplog.text and "train.use_gpu" in caplog.text

    if "dashboard" in ray_local_session:  # a cluster reached through its dashboard, as the flow's Ray jobs are
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines.rayutil"):
            check_resources("train", num_workers=1, cpus_per_worker=1, use_gpu=True,
                            address=ray_local_session["dashboard"])
        assert "train.use_gpu=true" in caplog.text and "2 CPUs, 0 GPUs" in caplog.text, caplog.text


@pytest.mark.slow
def test_paper_preset_on_a_machine_without_gpus_fails_before_training(train_data, tmp_path, ray_local):
    """README Tier 1 (``--set train.num_workers=1`` on configs/paper.yaml) without a GPU: an error, not a wait."""
    from alexnet.config import load_config
    from alexnet.train import run_training

    cfg = load_config(ROOT / "configs" / "paper.yaml", [f"data.data={train_data}", "train.num_workers=1",
                                                        f"train.storage_path={tmp_path / 'ray'}"])
    with pytest.raises(ResourceError, match="train.use_gpu=true"):
        run_training(cfg, tracking=False)
