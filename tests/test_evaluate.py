"""Evaluation's per-class error table and most confused class pairs: exact counts on known scores, and a real
checkpoint's tables logged beside top-1/top-5 in a real MLflow store."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

from alexnet import cli
from alexnet.evaluate import ClassTally, class_tables, evaluate_checkpoint, log_evaluation
from pipelines.prepare import load_manifest

CLASSES = [{"label": 0, "wnid": "n0", "words": "zero"}, {"label": 1, "wnid": "n1", "words": "one"},
           {"label": 2, "wnid": "n2", "words": "two"}, {"label": 3, "wnid": "n3", "words": "three"}]


def test_class_tally_counts_errors_and_confusions_per_class():
    tally = ClassTally(4)
    # each row's scores rank the classes in the listed order, top-1 first
    orders = [[0, 1, 2, 3], [0, 1, 2, 3], [1, 0, 2, 3], [2, 0, 1, 3],  # label 0
              [0, 2, 3, 1], [0, 2, 3, 1], [1, 0, 2, 3]]  # label 1: twice taken for 0, once right
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    scores = torch.zeros(len(orders), 4)
    for row, order in enumerate(orders):
        scores[row, order] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    tally(scores[:3], labels[:3])  # two batches add up
    tally(scores[3:], labels[3:])
    per_class = tally.per_class(CLASSES)
    assert [r["images"] for r in per_class] == [4, 3, 0, 0]
    assert per_class[0] == {"label": 0, "wnid": "n0", "words": "zero", "images": 4, "top1_err": 0.5,
                            "top5_err": 0.0}
    assert per_class[1]["top1_err"] == pytest.approx(2 / 3) and per_class[1]["top5_err"] == 0.0
    assert per_class[2]["top1_err"] is None  # no images of that class
    pairs = tally.confused_pairs(CLASSES)
    assert [(p["true_label"], p["predicted_label"], p["count"]) for p in pairs] == [(1, 0, 2), (0, 1, 1), (0, 2, 1)]
    assert pairs[0]["true_words"] == "one" and pairs[0]["predicted_wnid"] == "n0"
    assert len(tally.confused_pairs(CLASSES, limit=1)) == 1


def test_top5_misses_with_more_than_five_classes():
    tally = ClassTally(7)
    scores = torch.arange(7, dtype=torch.float32).flip(0).repeat(2, 1)  # ranks 0, 1, ..., 6
    tally(scores, torch.tensor([5, 4]))  # class 5 is sixth: a top-5 miss; class 4 is fifth: a hit
    rows = tally.per_class([{"label": i} for i in range(7)])
    assert rows[5]["top5_err"] == 1.0 and rows[4]["top5_err"] == 0.0 and rows[4]["top1_err"] == 1.0


def test_evaluation_logs_the_per_class_table_and_confused_pairs_to_mlflow(trained_imagenet, train_data, tmp_path,
                                                                            capsys):
    checkpoint, n = trained_imagenet["result"].checkpoint, 40
    result = evaluate_checkpoint(checkpoint, train_data, crops=1, limit=n)
    per_class = result["per_class"]
    assert len(per_class) == 10 and sum(r["images"] for r in per_class) == n
    assert [r["wnid"] for r in per_class] == [c["wnid"] for c in load_manifest(train_data)["classes"]]
    # the per-class misses add up to the overall errors
    for key in ("top1_err", "top5_err"):
        misses = sum(r[key] * r["images"] for r in per_class if r["images"])
        assert misses / n == pytest.approx(result[key])
    wrong = sum(p["count"] for p in result["confused_pairs"])
    assert wrong <= round(result["top1_err"] * n) and (wrong > 0) == (result["top1_err"] > 0)

    store = f"sqlite:///{tmp_path / 'eval.db'}"
    run_id = log_evaluation(result, tracking_uri=store, experiment="eval-tables")
    client = mlflow.MlflowClient(store)
    run = client.get_run(run_id)
    assert run.data.metrics["eval_val_1crop_top1_err"] == result["top1_err"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"per_class_val_1crop.json", "confused_pairs_val_1crop.json", "evaluation_val_1crop.json"} <= artifacts
    table = client.load_table(run.info.experiment_id, "per_class_val_1crop.json", run_ids=[run_id])
    assert list(table.columns[:6]) == ["label", "wnid", "words", "images", "top1_err", "top5_err"]
    assert table["images"].sum() == n and list(table["wnid"]) == [r["wnid"] for r in per_class]
    pairs = client.load_table(run.info.experiment_id, "confused_pairs_val_1crop.json", run_ids=[run_id])
    assert list(pairs["count"]) == [p["count"] for p in result["confused_pairs"]]
    assert set(class_tables(result)) == {"per_class_val_1crop.json", "confused_pairs_val_1crop.json"}

    # the CLI's JSON: the keys it always had, plus the confused pairs; the long per-class table stays in MLflow
    assert cli.main(["evaluate", "--checkpoint", checkpoint, "--data", train_data, "--limit", "8",
                     "--no-tracking"]) == 0
    out = capsys.readouterr().out
    payload = json.loads(out[out.index("{"):])
    assert {"top1_err", "top5_err", "loss", "crops", "split", "images", "epoch", "checkpoint", "data",
            "data_manifest_sha256", "trained_on_manifest_sha256", "mlflow_run_id", "paper",
            "confused_pairs"} <= set(payload)
    assert "per_class" not in payload
