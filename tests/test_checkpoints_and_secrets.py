"""Training state and secrets (issue 11): no checkpoint is unpickled, a resume on other data or another model is
refused, no credential reaches a Ray runtime_env, a log, an MLflow param or a job's command line, and auth headers
stay on their host. Units and loopback servers only: no Ray, no Prefect server."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.config import load_config

ROOT = Path(__file__).resolve().parents[1]


# --- checkpoints hold only what weights_only=True loads ------------------------------------------------------------


class _RunsCode:
    """Unpickling this writes a file: what a crafted checkpoint.pt would do with ``weights_only=False``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _crafted_checkpoint(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    torch.save({"model": _RunsCode(marker), "config": {}, "num_classes": 10, "epoch": 1}, folder / "checkpoint.pt")
    return folder


def _fake_dataset(root: Path, num_classes: int = 10, salt: str = "") -> str:
    """Just a manifest: what the driver reads before it starts Ray."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"num_classes": num_classes, "salt": salt, "splits": {}}))
    return str(root)


def _no_training(monkeypatch):
    """A tripwire: reaching Ray means the run was not refused up front."""
    import pipelines.rayutil

    def started(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(pipelines.rayutil, "ensure_ray", started)


def test_a_checkpoint_state_round_trips_through_weights_only_and_restores_the_rng():
    from alexnet.train import LRSchedule, build_optimizer, checkpoint_state, rng_state, safe_torch_load, set_rng_state

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()  # momentum buffers in the optimizer state
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    np.random.standard_normal()  # numpy now holds a cached gaussian
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    state = checkpoint_state(model=model, optimizer=optimizer, schedule=LRSchedule(0.01), epoch=1,
                             config=cfg.to_dict(), num_classes=2, manifest_sha256="ab", stats_sha256=None,
                             history=[{"epoch": 1, "val_top1_err": 0.5}], mlflow_run_id=None)
    buf = io.BytesIO()
    torch.save(state, buf)
    expected = (np.random.standard_normal(3), np.random.randint(0, 1 << 30, 3), random.random(), torch.rand(3))
    loaded = safe_torch_load(buf.getvalue(), name="checkpoint.pt")  # weights_only=True
    assert loaded["config"] == cfg.to_dict() and loaded["schedule"]["best"] == float("inf")
    set_rng_state(loaded["rng"])
    again = (np.random.standard_normal(3), np.random.randint(0, 1 << 30, 3), random.random(), torch.rand(3))
    assert np.array_equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])
    set_rng_state(rng_state())  # what it saves, it restores


def test_a_crafted_checkpoint_runs_no_code_in_evaluate_transfer_or_a_resumed_training(tmp_path, monkeypatch,
                                                                                       capsys):
    from alexnet.cli import main

    marker = tmp_path / "code-ran"
    crafted = _crafted_checkpoint(tmp_path / "evil", marker)
    data = _fake_dataset(tmp_path / "data")
    assert main(["evaluate", "--checkpoint", str(crafted), "--data", data, "--crops", "1", "--no-tracking"]) == 2
    assert "refusing to load" in capsys.readouterr().err and not marker.exists()
    assert main(["transfer", "caltech101", "--data", data, "--checkpoint", str(crafted / "checkpoint.pt"),
                 "--no-tracking"]) == 2
    assert "refusing to load" in capsys.readouterr().err and not marker.exists()

    # the run's latest checkpoint, as a rerun of the same train.run_name would resume it
    _crafted_checkpoint(tmp_path / "ray" / "evil-run" / "checkpoint_2026-01-01_00-00-00.000000", marker)
    _no_training(monkeypatch)
    assert main(["train", "--config", str(ROOT / "configs" / "smoke.yaml"), "--data", data, "--no-tracking",
                 "--set", f"train.storage_path={tmp_path / 'ray'}", "--set", "train.run_name=evil-run"]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "checkpoint.pt" in err and not marker.exists()


# --- a resume continues the same data and model, or is refused before training ----------------------------------


def _saved_run(tmp_path: Path, data: str, *overrides: str) -> tuple:
    """A run ``r`` with one checkpoint, written by ``checkpoint_state`` for ``overrides``' config and ``data``."""
    from alexnet.train import LRSchedule, build_optimizer, checkpoint_state
    from pipelines.prepare import manifest_hash

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.data={data}", "train.run_name=r",
                                                        f"train.storage_path={tmp_path / 'ray'}", *overrides])
    model = torch.nn.Linear(2, 2)
    state = checkpoint_state(model=model, optimizer=build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0),
                             schedule=LRSchedule(0.1), epoch=2, config=cfg.to_dict(), num_classes=10,
                             manifest_sha256=manifest_hash(data), stats_sha256=None, history=[], mlflow_run_id=None)
    for name in ("checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-01_00-00-09.000000"):
        folder = tmp_path / "ray" / "r" / name
        folder.mkdir(parents=True)
        torch.save(state, folder / "checkpoint.pt")
    return cfg, folder


def test_the_checks_read_the_small_sidecar_not_the_checkpoint_and_old_checkpoints_fall_back(tmp_path):
    from alexnet.checkpoints import META_FILE, checkpoint_meta, read_checkpoint_meta, save_checkpoint_files
    from alexnet.train import LRSchedule, ResumeRefused, build_optimizer, check_resume, checkpoint_state
    from alexnet.transfer import check_checkpoint
    from pipelines.prepare import manifest_hash

    data = _fake_dataset(tmp_path / "a")
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.data={data}", "train.run_name=r",
                                                        f"train.storage_path={tmp_path / 'ray'}"])
    model = torch.nn.Linear(2, 2)
    state = checkpoint_state(model=model, optimizer=build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0),
                             schedule=LRSchedule(0.1), epoch=2, config=cfg.to_dict(), num_classes=10,
                             manifest_sha256=manifest_hash(data), stats_sha256="cd",
                             history=[{"epoch": 1, "val_top1_err": 0.5}, {"epoch": 2, "val_top1_err": 0.4}],
                             mlflow_run_id="run-1")
    folder = tmp_path / "ray" / "r" / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir(parents=True)
    save_checkpoint_files(state, folder)
    meta = json.loads((folder / META_FILE).read_text())
    assert meta == json.loads(json.dumps(checkpoint_meta(state)))  # config, sha256, num_classes, epoch, history
    assert meta["epoch"] == 2 and meta["num_classes"] == 10 and meta["data_manifest_sha256"] == manifest_hash(data)
    assert json.loads((folder / "config.json").read_text()) == cfg.to_dict()

    # The weights are not read: with checkpoint.pt unreadable, the checks still answer from the sidecar.
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert check_resume(cfg, manifest_sha256=manifest_hash(data), num_classes=10) == str(folder)
    with pytest.raises(ResumeRefused, match="num_classes 10 != 5"):
        check_resume(cfg, manifest_sha256=manifest_hash(data), num_classes=5)
    assert check_checkpoint(str(folder))["epoch"] == 2
    assert check_checkpoint(str(folder / "checkpoint.pt"))["epoch"] == 2
    assert read_checkpoint_meta(str(folder))["history"] == state["history"]

    # A checkpoint from before the sidecar: the whole file is read (and this one is refused).
    (folder / META_FILE).unlink()
    with pytest.raises(ValueError, match="refusing to load"):
        check_resume(cfg, manifest_sha256=manifest_hash(data), num_classes=10)
    with pytest.raises(ValueError, match="refusing to load"):
        check_checkpoint(str(folder))
    torch.save(state, folder / "checkpoint.pt")
    assert check_resume(cfg, manifest_sha256=manifest_hash(data), num_classes=10) == str(folder)
    assert read_checkpoint_meta(str(folder)) == checkpoint_meta(state)


def test_resuming_on_other_data_or_another_model_is_refused_before_training(tmp_path, monkeypatch):
    from alexnet.train import ResumeRefused, check_resume, run_training
    from pipelines.prepare import manifest_hash

    data = _fake_dataset(tmp_path / "a")
    cfg, latest = _saved_run(tmp_path, data)
    sha = manifest_hash(data)
    assert check_resume(cfg, manifest_sha256=sha, num_classes=10) == str(latest)  # same data and model: resumes
    more_epochs = load_config(ROOT / "configs" / "smoke.yaml", [f"data.data={data}", "train.run_name=r",
                                                                f"train.storage_path={tmp_path / 'ray'}",
                                                                "train.epochs=50", "data.limit_train=7"])
    assert check_resume(more_epochs, manifest_sha256=sha, num_classes=10) == str(latest)

    _no_training(monkeypatch)
    other = _fake_dataset(tmp_path / "b", salt="other images")
    cfg.data.data = other
    with pytest.raises(ResumeRefused, match=r"data manifest sha256 .* != .*train.run_name.*train.resume=force") as e:
        run_training(cfg, tracking=False)
    assert "\n" not in str(e.value)

    variant = load_config(ROOT / "configs" / "smoke.yaml", [f"data.data={data}", "train.run_name=r",
                                                            f"train.storage_path={tmp_path / 'ray'}",
                                                            "model.groups=1", "data.crop=192"])
    with pytest.raises(ResumeRefused, match=r"model.groups 2 != 1; data.crop 224 != 192"):
        run_training(variant, tracking=False)
    with pytest.raises(ResumeRefused, match="num_classes 10 != 5"):
        check_resume(cfg, manifest_sha256=manifest_hash(other), num_classes=5)

    variant.train.resume = "force"  # the way out: continue anyway
    assert check_resume(variant, manifest_sha256=sha, num_classes=10) == str(latest)
    variant.train.resume = "never"
    with pytest.raises(ResumeRefused, match="train.resume=never"):
        check_resume(variant, manifest_sha256=sha, num_classes=10)
    variant.train.run_name = "fresh"  # a new name starts a new run
    assert check_resume(variant, manifest_sha256=sha, num_classes=10) is None


def test_train_resume_is_a_typed_config_key():
    assert load_config(None, ["train.resume=force"]).train.resume == "force"
    with pytest.raises(ValueError, match=r"train.resume must be one of \['auto', 'force', 'never'\]"):
        load_config(None, ["train.resume=sometimes"])


# --- no credential in a Ray runtime_env or a pickled filesystem ------------------------------------------------------

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID0001", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIsecretEXAMPLEKEY",
           "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLEsessiontoken"}


def test_ray_workers_get_s3_endpoints_but_never_credentials(monkeypatch):
    import pickle

    from flows.ray_jobs import job_env
    from pipelines import storage

    for k, v in {**SECRETS, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(k, v)
    env = storage.worker_env()["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["AWS_REGION"] == "eu-west-1"
    job = job_env("sqlite:///x.db")  # a Ray job's runtime_env, from the flow
    fs, _ = storage.filesystem("s3://bucket/data")  # pickled into Ray Data and Ray Train task arguments
    shipped = json.dumps(env) + json.dumps(job) + pickle.dumps(fs).decode("latin-1")
    assert not [name for name, secret in SECRETS.items() if secret in shipped or name in env]


# --- credentials in URIs reach no log, MLflow param or tag, error text or Ray job ---------------------------------

PRESIGNED = ("https://bucket.s3.amazonaws.com/ilsvrc?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAPRESIGNED%2F20260101%2Fus-east-1%2Fs3&X-Amz-Date=20260101T000000Z"
             "&X-Amz-Expires=3600&X-Amz-Security-Token=FwoGSESSIONTOKEN&X-Amz-Signature=5f3c0ffeeSIGNATURE")
URI_SECRETS = ("AKIAPRESIGNED", "FwoGSESSIONTOKEN", "5f3c0ffeeSIGNATURE", "pg-PASSWORD", "http-PASSWORD", "ghTOKEN",
               "azSIG")


def test_redact_uri_masks_passwords_and_signatures_and_keeps_the_rest():
    from pipelines.redact import redact_text, redact_uri

    assert redact_uri("postgresql://mlflow:pg-PASSWORD@db.internal:5432/mlflow") == \
        "postgresql://mlflow:***@db.internal:5432/mlflow"
    assert redact_uri("https://user:http-PASSWORD@mirror.example.org/ilsvrc") == "https://user:***@mirror.example.org/ilsvrc"
    assert redact_uri("https://ghTOKEN@github.com/x/y") == "https://***@github.com/x/y"
    shown = redact_uri(PRESIGNED)
    assert shown.startswith("https://bucket.s3.amazonaws.com/ilsvrc?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***")
    assert "X-Amz-Expires=3600" in shown and not [s for s in URI_SECRETS if s in shown]
    assert redact_uri("https://a.blob.core.windows.net/c/f.tar?sv=2022-11-02&sig=azSIG%3D") == \
        "https://a.blob.core.windows.net/c/f.tar?sv=2022-11-02&sig=***"
    for plain in ("s3://bucket/imagenet-256", "/data/imagenet", "sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000",
                  "https://mirror.example.org/ilsvrc?page=2"):
        assert redact_uri(plain) == plain
    text = f"HTTP 404 for {PRESIGNED}; also url: /ilsvrc?X-Amz-Signature=5f3c0ffeeSIGNATURE&x=1"
    assert not [s for s in URI_SECRETS if s in redact_text(text)] and "x=1" in redact_text(text)


def test_mlflow_params_tags_and_logged_dicts_hold_no_credentials(tmp_path):
    import mlflow

    from alexnet.tracking import RunLogger

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = RunLogger(store, "secrets", run_name="r", tags={"source": PRESIGNED})
    run.log_params({"tracking.tracking_uri": "postgresql://mlflow:pg-PASSWORD@db/mlflow", "flow.source_uri": PRESIGNED,
                    "flow.overrides": "train.storage_path=https://user:http-PASSWORD@h/runs"})
    run.set_tags({"alexnet.error": f"HTTP 403 for {PRESIGNED}"})
    run.log_dict({"checkpoint": "https://ghTOKEN@github.com/w.pt"}, "evaluation.json")
    run.end()
    data = mlflow.MlflowClient(store).get_run(run.run_id).data
    logged = mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="evaluation.json",
                                                 tracking_uri=store)
    stored = json.dumps([data.params, data.tags]) + Path(logged).read_text()
    assert data.params["tracking.tracking_uri"] == "postgresql://mlflow:***@db/mlflow"
    assert not [s for s in URI_SECRETS if s in stored], stored


def test_the_cli_and_its_logs_show_no_credentials_of_a_source_uri(tmp_path, capfd, caplog):
    import http.server
    import threading

    from alexnet.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):  # 404 for everything; its own access log is not ours
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(empty), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        source = (f"http://user:http-PASSWORD@127.0.0.1:{port}/ilsvrc?X-Amz-Credential=AKIAPRESIGNED"
                  "&X-Amz-Signature=5f3c0ffeeSIGNATURE")
        with caplog.at_level("DEBUG"):  # --verbose: urllib3 logs each request line, query included
            assert main(["--verbose", "download", "imagenet", "--from", source, "--to", str(tmp_path / "raw")]) == 2
    finally:
        server.shutdown()
        server.server_close()
    out, err = capfd.readouterr()
    assert "error:" in err and f"127.0.0.1:{port}" in err  # still says where
    shown = out + err + caplog.text
    assert not [s for s in URI_SECRETS if s in shown], shown


def test_a_ray_job_never_carries_credentials_on_its_command_line_or_in_its_env():
    from flows.ray_jobs import refuse_secrets_in_jobs, run_ray_job, run_stage

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        "tracking.tracking_uri=postgresql://mlflow:pg-PASSWORD@db/mlflow", "data.data=s3://b/imagenet-256"])
    # what the flow's train stage submits; refused before the cluster is contacted (nothing listens on port 9)
    with pytest.raises(ValueError, match="refusing to send credentials to Ray jobs.*PGPASSWORD") as e:
        run_stage("flows.stages:train", {"config": cfg.to_dict(), "parent_run_id": None, "tags": {}},
                  ray_address="http://127.0.0.1:9", env={})
    assert "postgresql://mlflow:***@db/mlflow" in str(e.value) and "pg-PASSWORD" not in str(e.value)
    with pytest.raises(ValueError, match="env MLFLOW_TRACKING_URI"):
        run_ray_job("http://127.0.0.1:9", "train", ["-m", "alexnet.cli", "stats", "--data", "s3://b/x"],
                    env={"MLFLOW_TRACKING_URI": "https://user:http-PASSWORD@mlflow.internal"})
    with pytest.raises(ValueError, match="raw_uri"):
        refuse_secrets_in_jobs({"raw_uri": PRESIGNED, "data_uri": "s3://b/x"})
    refuse_secrets_in_jobs({"data_uri": "s3://b/x", "tracking.tracking_uri": "postgresql://mlflow@db/mlflow"})
