"""``make smoke``: the pipeline end to end on a tiny synthetic ImageNet, on embedded defaults (local Ray,
local files, MLflow's default sqlite store).

Synthesises the official ILSVRC-2012 files (with the real archive's quirks), prepares them with Ray Data into
Parquet shards, computes the PCA statistics, trains the paper's network with Ray Train (2 CPU workers,
``configs/smoke.yaml``), evaluates the final checkpoint with the centre crop and the paper's ten crops, and
prints a summary. Reruns reuse what is already complete (data) or resume (training).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from alexnet.config import load_config
from alexnet.evaluate import evaluate_checkpoint
from alexnet.train import run_training
from alexnet.tracking import resolve_tracking_uri
from pipelines import prepare, stats, storage
from pipelines.synth import write_synthetic_imagenet

SMOKE_PRESET = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"

#: The tiny ImageNet of the smoke run: 500 images, 3 of them undecodable on purpose (0.6% < the 1% limit).
SMOKE_DATA = dict(classes=10, train_per_class=40, val_per_class=10, size=320, seed=0)


def run_smoke(workdir: str | Path = "runs/smoke") -> dict:
    """Run every stage that exists so far; returns the summary it prints."""
    workdir = Path(workdir)
    source, data = workdir / "imagenet-official", workdir / "prepared"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if not (source / "synth_info.json").exists():
        write_synthetic_imagenet(source, layout="official", **SMOKE_DATA)
    timings["synth"] = time.perf_counter() - t

    t = time.perf_counter()
    manifest = prepare.prepare_imagenet(str(source), str(data), shard_rows=128)
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    if storage.exists(storage.join(str(data), stats.STATS)):
        computed, _ = stats.load_stats(str(data))
    else:
        computed = stats.compute_stats(str(data))
    timings["stats"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = load_config(SMOKE_PRESET, [f"data.data={data}", f"train.storage_path={workdir / 'ray'}"])
    trained = run_training(cfg)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation = {crops: evaluate_checkpoint(trained.checkpoint, str(data), crops=crops) for crops in (1, 10)}
    timings["evaluate"] = time.perf_counter() - t

    return {
        "data": str(data),
        "splits": {s: {"rows": v["rows"], "rejected": v["rejected"], "shards": len(v["shards"])}
                   for s, v in manifest["splits"].items()},
        "rejects": [f"{r['key']}: {r['reason']}" for r in manifest["rejects"]],
        "eigval": [round(v, 6) for v in computed["eigval"]],
        "mean_rgb": [round(v, 4) for v in computed["mean_rgb"]],
        "train": {"epochs": trained.metrics.get("epoch"), "checkpoint": trained.checkpoint},
        "val_error": {f"{c} crop{'s' if c > 1 else ''}": {"top1": round(e["top1_err"], 4), "top5": round(e["top5_err"], 4)}
                      for c, e in evaluation.items()},
        "chance_top1_error": round(1 - 1 / manifest["num_classes"], 4),
        "mlflow": {"run_id": trained.mlflow_run_id, "tracking_uri": resolve_tracking_uri(),
                   "experiment": cfg.tracking.experiment},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet.smoke", description=__doc__)
    parser.add_argument("--workdir", default=os.environ.get("ALEXNET_SMOKE_DIR", "runs/smoke"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    summary = run_smoke(args.workdir)
    print("\n=== smoke run: summary ===")
    print(json.dumps(summary, indent=2))
    print(f"total {time.perf_counter() - started:.1f} s; outputs in {args.workdir}")
    print("open the MLflow UI with: make mlflow-ui   (then http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
