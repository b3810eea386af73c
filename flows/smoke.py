"""``make smoke``: the Prefect flow ``alexnet`` end to end on a tiny synthetic ImageNet, on embedded defaults.

Runs ``flows.alexnet_flow.alexnet_flow`` in this process: Prefect's temporary local API (unless
``PREFECT_API_URL`` names a server), a local Ray, local files and MLflow's default store (``sqlite:///mlflow.db``
unless ``MLFLOW_TRACKING_URI`` is set). The flow synthesises the official ILSVRC-2012 files (with the real
archive's quirks), prepares them with Ray Data into Parquet shards, computes the PCA statistics, trains the paper's
network with Ray Train (2 CPU workers, ``configs/smoke.yaml``), evaluates the final checkpoint with the centre crop
and the paper's ten crops, registers the model as ``alexnet-smoke`` (alias ``champion``), transfers it to synthetic
Caltech-101, Flowers-102 and VOC 2007 (linear probe and fine-tuning, the standard protocols) and prints a summary.
A rerun skips the stages that completed (Prefect's cache, kept in ``WORKDIR/prefect-results``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from alexnet.results import format_report

SMOKE_PRESET = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"

#: The tiny ImageNet of the smoke run: the preset's ``synthetic`` section (defaults: 10 classes, 40 + 10 images
#: each, 500 images, 3 of them undecodable on purpose: 0.6% < the 1% limit).

#: The registry name of smoke models (the paper preset registers ``alexnet``).
SMOKE_MODEL = "alexnet-smoke"


def run_smoke(workdir: str | Path = "runs/smoke", *, overrides: list[str] | None = None) -> dict:
    """Run the ``alexnet`` flow on the smoke data under ``workdir``; returns the summary the flow returns (rows and
    rejects per split, eigenvalues, errors with 1 and 10 crops, the transfer table, MLflow ids, stage states and
    timings)."""
    from flows.alexnet_flow import alexnet_flow

    workdir = Path(workdir).resolve()
    return alexnet_flow(
        preset=str(SMOKE_PRESET),
        overrides=[f"train.storage_path={workdir / 'ray'}", f"tracking.registered_model={SMOKE_MODEL}",
                   f"transfer.storage_path={workdir / 'transfer-ray'}", "prepare.shard_rows=128",
                   f"transfer_data.raw_root={workdir / 'transfer-raw'}", f"transfer_data.data_root={workdir / 'transfer'}",
                   *(overrides or [])],
        raw_uri=str(workdir / "imagenet-official"),
        data_uri=str(workdir / "prepared"),
        synthetic=True,
        results_dir=str(workdir / "prefect-results"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.environ.get("ALEXNET_SMOKE_DIR", "runs/smoke"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value of the smoke preset, e.g. --set train.epochs=2 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # every Prefect API call otherwise
    started = time.perf_counter()
    summary = run_smoke(args.workdir, overrides=args.overrides)
    print("\n=== smoke run: details ===")
    print(json.dumps(summary, indent=2, default=str))
    print("\n=== smoke run: summary ===")
    print(format_report(summary))
    print(f"total {time.perf_counter() - started:.1f} s; outputs in {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
