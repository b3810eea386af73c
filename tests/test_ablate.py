"""`alexnet ablate`: the paper net and each ablation as a Ray Tune trial running a Ray Train run, the table beside
the paper's deltas, MLflow's parent run with a child per ablation; the prefect deployment that runs it."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from alexnet.ablate import ABLATIONS, TRAINED, ablation_config, ablation_table
from alexnet.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
ROWS = [*TRAINED, "10-crop"]


def test_each_ablation_changes_one_switch_of_the_preset():
    base = load_config(ROOT / "configs" / "paper.yaml")
    changed = {}
    for name in TRAINED:
        cfg = ablation_config(base, name)
        assert cfg.train.run_name == f"alexnet-paper-{name}" and cfg.tracking.registered_model == ""
        diff = {f"{s}.{k}" for s, section in cfg.to_dict().items() for k, v in section.items()
                if v != base.to_dict()[s][k]} - {"train.run_name", "tracking.registered_model"}
        changed[name] = diff
    assert changed == {"paper": set(), "no-lrn": {"model.lrn"}, "no-overlap": {"model.overlap_pool"},
                       "one-gpu": {"model.variant"}, "no-lighting": {"data.lighting_std"},
                       "no-dropout": {"model.dropout"}}
    assert ablation_config(base, "no-lighting").data.lighting_std == 0.0
    assert ablation_config(base, "one-gpu").model.variant == "one-gpu"


def test_table_sets_deltas_beside_the_papers():
    trials = {"paper": {"top1_err": 0.40, "top5_err": 0.18, "eval_1crop_top1_err": 0.42, "eval_1crop_top5_err": 0.20,
                        "eval_10crop_top1_err": 0.41, "eval_10crop_top5_err": 0.19},
              "no-lrn": {"top1_err": 0.415, "top5_err": 0.19}, "one-gpu": {"error": "boom"}}
    table = ablation_table(trials)
    assert table["ablation"] == ROWS and all(len(column) == len(ROWS) for column in table.values())
    by = {name: dict(zip(table, values)) for name, values in zip(table["ablation"], zip(*table.values()))}
    assert by["no-lrn"]["delta_top1_pct"] == -1.5 and by["no-lrn"]["paper_delta_top1_pct"] == -1.4
    assert by["10-crop"]["delta_top1_pct"] == -1.0 and by["10-crop"]["paper_delta_top5_pct"] == -1.3
    assert by["one-gpu"]["status"] == "failed" and by["no-overlap"]["status"] == "not run"
    assert by["paper"]["delta_top1_pct"] == ""


@pytest.mark.slow
def test_ablation_smoke_runs_every_trial_on_ray_tune(train_data, tmp_path, ray_local):
    from alexnet.ablate import run_ablations

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # one step of 16 images per trial and 16 validation images (160 patches for the 10-crop row): what this proves
    # is the machinery (six Ray Train runs as Tune trials, the 10-crop row, MLflow's parent and children)
    cfg = load_config(ROOT / "configs" / "ablate-smoke.yaml", [
        f"data.data={train_data}", f"train.storage_path={tmp_path / 'ray'}", f"tracking.tracking_uri={store}",
        "data.limit_train=16", "data.limit_val=16", "train.batch_size=16"])
    result = run_ablations(cfg)
    table = result.table
    assert table["ablation"] == ROWS and all(len(column) == len(ROWS) for column in table.values())
    assert table["status"] == ["finished"] * len(ROWS), table
    assert all(isinstance(v, float) for v in table["top1_err_pct"] + table["delta_top1_pct"][1:])
    assert set(result.trials) == set(TRAINED)
    assert all(t["epochs"] == 1 and t["checkpoint"] for t in result.trials.values())
    # each trial was its own Ray Train run, under the Tune experiment's storage
    assert {p.name for p in (tmp_path / "ray").iterdir()} >= {f"alexnet-ablate-smoke-{n}" for n in TRAINED}

    client = mlflow.MlflowClient(store)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "ablations"
    assert {"ablations.md", "ablations.csv", "ablations.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["no-lrn.delta_top1_pct"] == table["delta_top1_pct"][1]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["ablation"] for c in children) == sorted(ROWS)
    assert all(c.info.status == "FINISHED" for c in children)
    by_name = {c.data.tags["ablation"]: c for c in children}
    assert by_name["no-lrn"].data.params["model.lrn"] == "False"
    assert "eval_10crop_top1_err" in by_name["10-crop"].data.metrics
