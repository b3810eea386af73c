"""``make smoke``: the pipeline end to end on a tiny synthetic ImageNet, on embedded defaults (local Ray, files).

Synthesises the official ILSVRC-2012 files (with the real archive's quirks), prepares them with Ray Data into
Parquet shards, computes the PCA statistics, and prints a summary. Reruns reuse what is already complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from pipelines import prepare, stats, storage
from pipelines.synth import write_synthetic_imagenet

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

    return {
        "data": str(data),
        "splits": {s: {"rows": v["rows"], "rejected": v["rejected"], "shards": len(v["shards"])}
                   for s, v in manifest["splits"].items()},
        "rejects": [f"{r['key']}: {r['reason']}" for r in manifest["rejects"]],
        "eigval": [round(v, 6) for v in computed["eigval"]],
        "mean_rgb": [round(v, 4) for v in computed["mean_rgb"]],
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
