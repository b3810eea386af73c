"""Training: the recipe's parts, and real Ray Train runs on CPU (2 workers, gloo) that learn, resume and
survive a killed worker; S3 storage on loopback; MLflow's real store; evaluation with 1 and 10 crops."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from alexnet.config import load_config
from alexnet.train import LRSchedule, build_optimizer, load_checkpoint, model_from_checkpoint, topk_correct
from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]


# --- units ---------------------------------------------------------------------------------------------------------


def test_plateau_schedule_divides_by_ten_at_most_three_times():
    s = LRSchedule(0.01, "plateau", patience=2, threshold=0.001, max_drops=3)
    lrs = []
    for epoch, err in enumerate([0.9, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7] + [0.7] * 10):
        s.step(epoch, err)
        lrs.append(s.lr)
    assert lrs[:4] == [0.01, 0.01, 0.01, 0.001]  # two epochs without improvement after 0.8
    assert math.isclose(lrs[6], 1e-4) and math.isclose(min(lrs), 1e-5)  # three drops, never a fourth
    restored = LRSchedule(0.01, "plateau", patience=2, max_drops=3)
    restored.load_state_dict(s.state_dict())
    assert restored.lr == s.lr


def test_plateau_schedule_waits_before_the_first_drop_and_between_drops():
    # A run stalled from the start (the error never improves) with patience 2: without the minimum spacing the
    # three drops would come at epochs 3, 5 and 7; with 10 / 10 they come at epochs 10, 20 and 30.
    s = LRSchedule(0.01, "plateau", patience=2, threshold=0.001, max_drops=3, min_epochs_before=10,
                   min_epochs_between=10)
    drops = [epoch + 1 for epoch in range(40) if s.step(epoch, 0.9)]
    assert drops == [10, 20, 30]
    eager = LRSchedule(0.01, "plateau", patience=2, threshold=0.001, max_drops=3)
    assert [epoch + 1 for epoch in range(40) if eager.step(epoch, 0.9)] == [3, 5, 7]
    restored = LRSchedule(0.01, "plateau", patience=2, min_epochs_before=10, min_epochs_between=10)
    restored.load_state_dict(s.state_dict())
    assert restored.last_drop_epoch == 30 and restored.drops == 3
    paper = load_config(ROOT / "configs" / "paper.yaml").train
    assert (paper.min_epochs_before_drop, paper.min_epochs_between_drops, paper.max_lr_drops) == (10, 10, 3)


def test_chance_loss_warning():
    from alexnet.train import chance_loss_warning

    assert "STALLED" in chance_loss_warning(6.90, 1000)  # ln(1000) = 6.908
    assert "STALLED" in chance_loss_warning(math.log(10) * 1.009, 10)
    assert chance_loss_warning(6.80, 1000) is None  # more than 1% below
    assert chance_loss_warning(1.5, 10) is None


def test_stalled_start_is_loud_in_the_log_and_mlflow(tmp_path, caplog):
    from alexnet.tracking import RunLogger
    from alexnet.train import warn_if_stalled

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunLogger(store, "stall", run_name="stalled")
    with caplog.at_level("WARNING", logger="alexnet.train"):
        assert warn_if_stalled(math.log(10) + 0.001, 10, tracker)
        assert warn_if_stalled(1.2, 10, tracker) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "alexnet.train" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "STALLED AT CHANCE" in warnings[0]
    run = mlflow.MlflowClient(store).get_run(tracker.run_id)
    assert "ln(10)" in run.data.tags["warning.loss_at_chance"] and run.data.metrics["loss_at_chance"] == 1.0


def test_step_schedule():
    s = LRSchedule(0.1, "step", step_epochs=[2, 4])
    lrs = []
    for epoch in range(5):
        s.step(epoch, 0.5)
        lrs.append(round(s.lr, 6))
    assert lrs == [0.1, 0.01, 0.01, 0.001, 0.001]


def test_sgd_matches_the_papers_update_rule_and_spares_biases():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    w = model.weight.detach().clone()
    v = torch.zeros_like(w)
    torch.manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3)
        opt.zero_grad()
        model(x).square().sum().backward()
        grad = model.weight.grad.detach().clone()
        v = 0.9 * v - 0.0005 * 0.01 * w - 0.01 * grad  # the paper, section 5
        w = w + v
        opt.step()
        assert torch.allclose(model.weight.detach(), w, atol=1e-7)


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2)) == [1, 2]


def _eval_flat(pred: np.ndarray, gt: np.ndarray, max_num_pred_per_image: int = 5) -> list[float]:
    """The ILSVRC-2012 devkit's ``eval_flat.m``: an image is an error at k when none of its first k predictions is
    its ground truth; the error at k is the mean over images."""
    errors = []
    for k in range(1, max_num_pred_per_image + 1):
        wrong = np.all(pred[:, :k] != gt[:, None], axis=1)
        errors.append(float(np.sum(wrong) / len(gt)))
    return errors


def test_top1_top5_error_equals_the_ilsvrc_devkit_on_random_predictions():
    from alexnet.train import errors

    gen = torch.Generator().manual_seed(2012)
    for trial in range(200):
        n, classes = int(torch.randint(1, 60, (1,), generator=gen)), int(torch.randint(5, 30, (1,), generator=gen))
        logits = torch.randn(n, classes, generator=gen)
        labels = torch.randint(0, classes, (n,), generator=gen)
        top1, top5 = topk_correct(logits, labels)
        ours = errors({"loss_sum": 0.0, "top1": top1, "top5": top5, "seen": n})
        pred = logits.argsort(dim=1, descending=True)[:, :5].numpy()  # the submission: 5 labels, best first
        devkit = _eval_flat(pred, labels.numpy())
        assert (ours["top1_err"], ours["top5_err"]) == (devkit[0], devkit[4]), trial


def test_seed_everything_replays_python_numpy_and_torch():
    import random

    from alexnet.train import seed_everything

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first


def test_training_and_fine_tuning_build_their_trainer_with_make_trainer(tmp_path):
    from ray.train.torch import TorchTrainer

    from alexnet import finetune, transfer
    from alexnet.train import make_trainer, train_loop_per_worker

    trainer, fs = make_trainer(train_loop_per_worker, {"config": {}}, run_name="r", storage_path=str(tmp_path),
                               num_workers=2, cpus_per_worker=1, use_gpu=False, max_failures=3,
                               checkpoints_to_keep=2)
    assert isinstance(trainer, TorchTrainer) and fs is None
    run, scaling = trainer.run_config, trainer.scaling_config
    assert (run.name, run.storage_path, run.failure_config.max_failures, run.checkpoint_config.num_to_keep) == (
        "r", str(tmp_path), 3, 2)
    assert (scaling.num_workers, scaling.use_gpu, scaling.resources_per_worker) == (2, False, {"CPU": 1})
    # fine-tuning has no TorchTrainer of its own: it goes through the same builder
    import inspect

    assert "TorchTrainer(" not in inspect.getsource(transfer) + inspect.getsource(finetune)
    assert "make_trainer(" in inspect.getsource(finetune.finetune)


# --- Ray Train on CPU ------------------------------------------------------------------------------------------------

def _config(data: str, tmp_path: Path, *overrides: str):
    return load_config(ROOT / "configs" / "smoke.yaml", [
        f"data.data={data}", f"train.storage_path={tmp_path / 'ray'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])


@pytest.mark.slow
def test_two_workers_learn_and_log_to_mlflow(trained_imagenet):
    result, tmp_path = trained_imagenet["result"], trained_imagenet["tmp"]
    assert result.metrics["epoch"] == 3
    assert result.metrics["val_top1_err"] < 0.6, result.history  # chance is 0.9 with 10 classes
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    state = load_checkpoint(result.checkpoint)
    assert state["epoch"] == 3 and state["num_classes"] == 10 and state["data_manifest_sha256"]
    assert set(state) >= {"model", "optimizer", "schedule", "rng", "config", "history", "stats_sha256"}
    model_from_checkpoint(state)  # loads into a fresh network

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "32" and run.data.params["derived.world_size"] == "2"
    assert not [k for k in run.data.params if k.startswith("transfer.")]  # not a training setting
    assert len(client.get_metric_history(run.info.run_id, "val_top1_err")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "history.json", "curves.png"} <= artifacts
    assert run.data.tags["data_manifest_sha256"] and run.data.tags["git_commit"]


@pytest.mark.slow
def test_training_leaves_no_placement_group_and_its_cleaner_sees_the_state_api(trained_imagenet, ray_local,
                                                                               ray_local_session):
    """Ray Train V2's placement-group cleaner polls the state API (served by the dashboard): on a local Ray without
    it, it logged "Failed to query Ray Train Controller actor state" every second and could never see a dead
    controller; with several Rays on the machine its client did not know which to ask, and its thread died. The
    local Ray serves it and tells the workers where; the run's placement group is gone after the run."""
    assert trained_imagenet["result"].checkpoint
    groups = ray_local.util.placement_group_table()
    assert groups and all(g["state"] == "REMOVED" for g in groups.values()), groups
    if "dir" not in ray_local_session:
        pytest.skip("Ray was started outside the ray_local fixture: its logs are elsewhere")
    logs = Path(ray_local_session["dir"]) / "logs"
    # neither the warning nor the cleaner's thread dying (its state API client finding several Rays on the machine)
    signs = (b"Failed to query Ray Train Controller actor state", b"Exception in thread PlacementGroupCleanerMonitor")
    noisy = [p.name for p in logs.rglob("*") if p.is_file() and p.suffix in (".out", ".err", ".log")
             and any(sign in p.read_bytes() for sign in signs)]
    assert not noisy, noisy


#: The killed-and-resumed run: 32 images a worker an epoch (``data.limit_*`` count per rank: 64 an epoch, two steps
#: of the global batch 32), and no model logged to MLflow: what it proves is restart and resume (the ``learn`` run
#: of ``trained_imagenet`` logs a model; serialising 61M weights twice more here proved nothing else).
KILLED_RUN = ("data.limit_train=32", "data.limit_val=32", "tracking.log_model=false")


def _worker_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(train_data, tmp_path, ray_local):
    from alexnet.train import run_training

    cfg = _config(train_data, tmp_path, "train.epochs=3", "train.run_name=killed", *KILLED_RUN, "train.max_failures=2")
    run_dir = tmp_path / "ray" / "killed"
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if list(run_dir.glob("checkpoint_*/checkpoint.pt")):
                pids = _worker_pids()
                if pids:
                    victim = max(pids)
                    subprocess.run(["kill", "-9", str(victim)])
                    killed.append(victim)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = run_training(cfg)
    killer.join(timeout=5)
    assert killed, "no worker was killed: the run ended before its first checkpoint was seen"
    assert result.metrics["epoch"] == 3
    assert [h["epoch"] for h in result.history] == [1, 2, 3]  # no epoch lost or repeated
    model_from_checkpoint(load_checkpoint(result.checkpoint))

    # rerunning the same run name resumes: two more epochs, not five
    more = run_training(_config(train_data, tmp_path, "train.epochs=5", "train.run_name=killed", *KILLED_RUN))
    assert [h["epoch"] for h in more.history] == [1, 2, 3, 4, 5]
    assert more.history[:3] == result.history


@pytest.fixture(scope="module")
def remote_run(train_data, s3_endpoint, ray_local, tmp_path_factory):
    """One training run against both remote ends: checkpoints on S3 (moto on loopback) and tracking on an MLflow
    tracking server (a real ``mlflow server``), shared by the two tests below (a Ray Train run each cost the same
    start-up twice)."""
    import socket

    import boto3

    from alexnet.train import run_training

    tmp_path = tmp_path_factory.mktemp("remote")
    (port,) = free_ports(1)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts"), "--workers", "1"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        boto3.client("s3").create_bucket(Bucket="alexnet-runs")
        cfg = _config(train_data, tmp_path, "train.epochs=1", "train.run_name=s3run", "data.limit_train=32",
                      "data.limit_val=16", "train.storage_path=s3://alexnet-runs/ray", f"tracking.tracking_uri={uri}",
                      "tracking.log_model=false")
        yield {"result": run_training(cfg), "uri": uri}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_checkpoints_on_s3(remote_run):
    result = remote_run["result"]
    assert result.checkpoint.startswith("s3://alexnet-runs/ray/s3run/")
    state = load_checkpoint(result.checkpoint)
    assert state["epoch"] == 1


@pytest.mark.slow
def test_tracking_server(remote_run):
    """The same training logs to an MLflow tracking server (not only to a local store)."""
    result, uri = remote_run["result"], remote_run["uri"]
    run = mlflow.MlflowClient(uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and "val_top1_err" in run.data.metrics
    assert any(a.path == "curves.png" for a in mlflow.MlflowClient(uri).list_artifacts(result.mlflow_run_id))


@pytest.mark.slow
def test_evaluate_centre_and_ten_crops_from_the_cli(train_data, trained_imagenet, tmp_path):
    # the checkpoint of the session's training run (its MLflow run is in another store: the CLI logs a new run)
    result = trained_imagenet["result"]
    store = f"sqlite:///{tmp_path / 'eval.db'}"
    for crops in (1, 10):
        out = subprocess.run([sys.executable, "-m", "alexnet.cli", "evaluate", "--checkpoint", result.checkpoint,
                              "--data", train_data, "--crops", str(crops), "--limit", "40"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "MLFLOW_TRACKING_URI": store})
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"({crops} crop" in out.stdout and "top-1 error" in out.stdout
        payload = json.loads(out.stdout[out.stdout.index("{"):])
        assert payload["crops"] == crops and payload["images"] == 40
        assert 0 <= payload["top5_err"] <= payload["top1_err"] <= 1
        run = mlflow.MlflowClient(store).get_run(payload["logged_to_mlflow_run"])
        assert run.data.metrics[f"eval_val_{crops}crop_top1_err"] == payload["top1_err"]
