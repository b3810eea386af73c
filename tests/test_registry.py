"""``alexnet.registry.promote_model`` and ``alexnet register`` on a real MLflow store (sqlite in tmp_path): the
alias moves to a better version on the same data, stays on a worse one, and moves when the data changed."""

from __future__ import annotations

import json

import pytest


def _trained_run(client, experiment_id: str, name: str, *, top1: float, manifest: str) -> str:
    """A training run that logged ``alexnet evaluate``'s metrics and registered a version of ``name``."""
    run = client.create_run(experiment_id, tags={"data_manifest_sha256": manifest})
    run_id = run.info.run_id
    client.log_metric(run_id, "eval_val_10crop_top1_err", top1)
    client.log_metric(run_id, "eval_val_10crop_top5_err", top1 / 2)
    client.set_terminated(run_id)
    try:
        client.create_registered_model(name)
    except Exception:  # noqa: BLE001 - exists after the first run
        pass
    client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    return run_id


def test_alexnet_register_moves_the_alias_only_to_a_better_version_on_the_same_data(tmp_path, capsys):
    import mlflow

    from alexnet.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("alexnet")
    first = _trained_run(client, experiment_id, "alexnet-t", top1=0.5, manifest="aaa")
    worse = _trained_run(client, experiment_id, "alexnet-t", top1=0.6, manifest="aaa")
    other_data = _trained_run(client, experiment_id, "alexnet-t", top1=0.9, manifest="bbb")

    def register(run_id: str) -> dict:
        assert main(["register", "--run-id", run_id, "--name", "alexnet-t", "--tracking-uri", uri,
                     "--tag", "source=test"]) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index("{"):])

    assert register(first) == {"name": "alexnet-t", "version": 1, "alias": "champion",
                               "alias_reason": "no current holder", "top1_err": 0.5}
    held = register(worse)
    assert held["alias"] is None and "version 1 has top-1 error 0.5000" in held["alias_reason"]
    assert client.get_model_version_by_alias("alexnet-t", "champion").version in (1, "1")
    moved = register(other_data)
    assert moved["alias"] == "champion" and "other data" in moved["alias_reason"]
    version = client.get_model_version_by_alias("alexnet-t", "champion")
    assert str(version.version) == "3" and version.tags["val_top1_err"] == "0.900000"
    assert version.tags["data_manifest_sha256"] == "bbb" and version.tags["source"] == "test"


def test_alexnet_register_says_to_evaluate_first(tmp_path, capsys):
    import mlflow

    from alexnet.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("alexnet")).info.run_id
    assert main(["register", "--run-id", run_id, "--name", "alexnet-t", "--tracking-uri", uri]) == 2
    assert "alexnet evaluate --checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["alexnet.registry", "alexnet.results"])
def test_library_modules_import_nothing_from_flows(module):
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'flows' or m.startswith('flows.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
