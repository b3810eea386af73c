"""The paper's ablations by one command: the paper net and each ablation as its own Ray Train run, side by side on
Ray Tune, and the table of their error changes beside the paper's.

Krizhevsky et al. 2012 report what each of their choices is worth on ILSVRC validation error (top-1 / top-5):
local response normalisation -1.4 / -1.2 (section 3.3), overlapping pooling -0.4 / -0.3 (3.4), the two-GPU net
against a one-GPU net with half the kernels -1.7 / -1.2 (3.2), PCA lighting "over 1%" top-1 (4.1), and the ten
test patches against one -1.5 / -1.3 (ILSVRC-2010 test: 37.5 / 17.0 against 39.0 / 18.3). Dropout has no number
(4.2: "without dropout, our network exhibits substantial overfitting").

Each ablation is a set of config overrides of the preset (:data:`ABLATIONS`); a Tune grid over their names runs one
trial per ablation, and each trial is a ``TorchTrainer(...).fit()`` (``alexnet.train.run_training``), the way Ray
Train V2 runs inside Tune (the trial function launches the Train run; its workers ask for their own resources, so
a cluster runs as many trials at once as it has room for workers). The 10-crop row is evaluation only, from the
paper trial's checkpoint. A delta is ``error(paper net) - error(ablation)``: the change the feature brings,
negative when it helps, the sign of the paper's numbers.

    alexnet ablate --config configs/paper.yaml --data s3://bucket/imagenet-256
    alexnet ablate --config configs/ablate-smoke.yaml --data runs/smoke/prepared   # minutes on a CPU
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

from alexnet.config import Config
from alexnet.results import csv_text, markdown

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Ablation:
    """One row of the table: what it changes (config overrides of the preset) and the paper's delta (None: the
    paper gives no number)."""

    name: str
    removes: str
    overrides: tuple[str, ...]
    paper_top1: float | None
    paper_top5: float | None
    source: str


PAPER = "paper"
TEN_CROP = "10-crop"
ABLATIONS: tuple[Ablation, ...] = (
    Ablation(PAPER, "nothing (the paper net)", (), None, None, "section 3"),
    Ablation("no-lrn", "local response normalisation", ("model.lrn=false",), -1.4, -1.2, "section 3.3"),
    Ablation("no-overlap", "overlapping pooling (3/2 -> 2/2)", ("model.overlap_pool=false",), -0.4, -0.3,
             "section 3.4"),
    Ablation("one-gpu", "the two towers (one tower, half the kernels)", ("model.variant=one-gpu",), -1.7, -1.2,
             "section 3.2"),
    Ablation("no-lighting", "PCA lighting", ("data.lighting_std=0",), -1.0, None, "section 4.1 (\"over 1%\")"),
    Ablation("no-dropout", "dropout", ("model.dropout=0",), None, None, "section 4.2 (no number)"),
)
#: Evaluation only: ten test patches against the centre one, on the paper trial's checkpoint.
TEN_CROP_ROW = Ablation(TEN_CROP, "1 crop -> 10 crops (evaluation only)", (), -1.5, -1.3,
                        "section 4.1, ILSVRC-2010 test 37.5/17.0 vs 39.0/18.3")
TRAINED = tuple(a.name for a in ABLATIONS)


def ablation_config(base: Config, ablation: str) -> Config:
    """The preset ``base`` with an ablation's overrides, its own Ray Train run name and no registered model."""
    (spec,) = [a for a in ABLATIONS if a.name == ablation]
    raw = base.to_dict()
    for item in spec.overrides:  # parsed to the field's type by from_dict, like --set
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        raw[section][name] = value
    raw["train"]["run_name"] = f"{base.train.run_name}-{ablation}"
    raw["tracking"]["registered_model"] = ""  # the ablations are measurements, not models to serve
    return Config.from_dict(raw)


def _trial(params: dict[str, Any], *, base: dict[str, Any], parent_run_id: str | None, tracking: bool,
           ten_crop: bool) -> dict[str, Any]:
    """One Tune trial: a full Ray Train run of one ablation (and, for the paper net, the 1- and 10-crop
    evaluation of its checkpoint). Returns its final numbers, Tune's result of the trial."""
    from alexnet.evaluate import evaluate_checkpoint
    from alexnet.train import run_training

    name = params["ablation"]
    cfg = ablation_config(Config.from_dict(base), name)
    result = run_training(cfg, tracking=tracking, parent_run_id=parent_run_id, tags={"ablation": name})
    out = {"ablation": name, "epochs": result.metrics.get("epoch"), "checkpoint": result.checkpoint or "",
           "mlflow_run_id": result.mlflow_run_id or "", "top1_err": result.metrics["val_top1_err"],
           "top5_err": result.metrics["val_top5_err"]}
    if name == PAPER and ten_crop and result.checkpoint:
        limit = cfg.data.limit_val or None
        for crops in (1, 10):
            e = evaluate_checkpoint(result.checkpoint, cfg.data.data, crops=crops, split=cfg.data.val_split,
                                    batch_size=max(1, cfg.train.batch_size // cfg.train.num_workers), limit=limit,
                                    device="cuda" if cfg.train.use_gpu else "cpu")
            out |= {f"eval_{crops}crop_top1_err": e["top1_err"], f"eval_{crops}crop_top5_err": e["top5_err"]}
    return out


def _delta(paper: float | None, other: float | None) -> float | None:
    return None if paper is None or other is None else round(100 * (paper - other), 2)


def ablation_table(trials: dict[str, dict[str, Any]]) -> dict[str, list]:
    """Columns of the table: each trial's errors, its delta against the paper net, the paper's delta. A trial that
    did not finish has status ``failed`` and no numbers."""
    paper = trials.get(PAPER) or {}
    rows = []
    for spec in (*ABLATIONS, TEN_CROP_ROW):
        if spec.name == TEN_CROP:
            t1, t5 = paper.get("eval_10crop_top1_err"), paper.get("eval_10crop_top5_err")
            r1, r5 = paper.get("eval_1crop_top1_err"), paper.get("eval_1crop_top5_err")
            status = "finished" if t1 is not None else ("failed" if paper.get("error") else "not run")
        else:
            trial = trials.get(spec.name) or {}
            t1, t5 = trial.get("top1_err"), trial.get("top5_err")
            r1, r5 = paper.get("top1_err"), paper.get("top5_err")
            status = "failed" if trial.get("error") else ("finished" if t1 is not None else "not run")
        ours1 = None if spec.name == PAPER else (_delta(t1, r1) if spec.name == TEN_CROP else _delta(r1, t1))
        ours5 = None if spec.name == PAPER else (_delta(t5, r5) if spec.name == TEN_CROP else _delta(r5, t5))
        rows.append((spec.name, spec.removes, _pct(t1), _pct(t5), ours1, ours5, spec.paper_top1, spec.paper_top5,
                     spec.source, status))
    names = ["ablation", "removes", "top1_err_pct", "top5_err_pct", "delta_top1_pct", "delta_top5_pct",
             "paper_delta_top1_pct", "paper_delta_top5_pct", "paper_source", "status"]
    return {n: [("" if row[i] is None else row[i]) for row in rows] for i, n in enumerate(names)}


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


@dataclasses.dataclass
class AblationResult:
    table: dict[str, list]
    trials: dict[str, dict[str, Any]]
    mlflow_run_id: str | None


def run_ablations(cfg: Config, *, only: list[str] | None = None, ten_crop: bool = True,
                  max_concurrent: int = 0, ray_address: str | None = None, tracking: bool = True,
                  parent_run_id: str | None = None) -> AblationResult:
    """Train the paper net and each ablation of ``only`` (default all, the paper net always) as Ray Tune trials,
    evaluate 1 vs 10 crops, log a parent MLflow run (a child run per trial, the table as artifacts) and return the
    table. ``max_concurrent`` 0: as many trials at once as the cluster has room for their Ray Train workers.
    Rerunning resumes each trial's Ray Train run from its latest checkpoint."""
    import ray
    from ray import tune

    from alexnet.tracking import RunLogger, git_commit, resolve_tracking_uri
    from alexnet.train import ray_storage
    from pipelines import prepare, storage
    from pipelines.rayutil import ensure_ray

    names = [PAPER] + [n for n in (only or TRAINED) if n != PAPER]
    unknown = sorted(set(names) - set(TRAINED))
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {list(TRAINED)}")
    if not cfg.data.data:
        raise ValueError("no dataset: pass --data URI (a folder or s3:// prefix written by `alexnet prepare`)")
    cfg = Config.from_dict(cfg.to_dict())
    # Trials run in other processes and folders: every location absolute, decided here.
    cfg.data.data = storage.absolute(cfg.data.data)
    cfg.train.storage_path = storage.absolute(cfg.train.storage_path)
    prepare.load_manifest(cfg.data.data)
    ensure_ray(ray_address)

    tracker = None
    if tracking:
        cfg.tracking.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri or None)
        tracker = RunLogger(cfg.tracking.tracking_uri, cfg.tracking.experiment, run_name=f"{cfg.train.run_name}-ablations",
                            parent_run_id=parent_run_id, tags={"git_commit": git_commit(), "kind": "ablations",
                                                               "data_manifest_sha256": prepare.manifest_hash(cfg.data.data)})
        tracker.log_params({k: v for k, v in cfg.flat().items() if not k.startswith("transfer.")}
                           | {"ablations": ",".join(names), "ten_crop": ten_crop})
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
    room = int(ray.cluster_resources().get("GPU" if cfg.train.use_gpu else "CPU", 1)
               // (cfg.train.num_workers if cfg.train.use_gpu else per_trial))
    concurrent = max_concurrent or max(1, min(len(names), room))

    storage_path, storage_filesystem = ray_storage(cfg.train.storage_path)
    trainable = tune.with_parameters(_trial, base=cfg.to_dict(), parent_run_id=tracker.run_id if tracker else None,
                                     tracking=tracking, ten_crop=ten_crop)
    # The trial function only drives its Ray Train run, whose workers reserve the CPUs/GPUs themselves (Train V2
    # does not run inside the trial's placement group). Tune refuses an all-zero request, and any CPU share would
    # keep a worker of the next trial from fitting, so a trial asks for one byte of memory.
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"memory": 1}),
        param_space={"ablation": tune.grid_search(names)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=f"{cfg.train.run_name}-ablations", storage_path=storage_path,
                                  storage_filesystem=storage_filesystem, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    log.info("ablations %s: %d trial(s) at a time", names, concurrent)
    grid = tuner.fit()
    trials: dict[str, dict[str, Any]] = {}
    for result in grid:
        name = result.config["ablation"]
        trials[name] = dict(result.metrics or {}) | ({"error": str(result.error)} if result.error else {})
    table = ablation_table(trials)
    if tracker:
        _log_table(tracker, cfg, table, trials)
    failed = [n for n in names if trials.get(n, {}).get("error") or "top1_err" not in trials.get(n, {})]
    if tracker:
        tracker.end("FAILED" if failed else "FINISHED")
    if failed:
        log.error("ablations, with failed trials:\n%s", markdown(table))
        raise RuntimeError(f"ablation trial(s) {failed} did not finish: {[trials.get(n, {}).get('error') for n in failed]}")
    return AblationResult(table, trials, tracker.run_id if tracker else None)


def _log_table(tracker: Any, cfg: Config, table: dict[str, list], trials: dict[str, dict[str, Any]]) -> None:
    """The parent run: a metric per row and delta, the table as markdown/CSV/JSON; the 10-crop row its own child."""
    from alexnet.tracking import RunLogger

    metrics = {}
    for i, name in enumerate(table["ablation"]):
        for column in ("top1_err_pct", "top5_err_pct", "delta_top1_pct", "delta_top5_pct"):
            if table[column][i] != "":
                metrics[f"{name}.{column}"] = float(table[column][i])
    tracker.log_metrics(metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        for filename, text in (("ablations.md", markdown(table)), ("ablations.csv", csv_text(table))):
            (Path(tmp) / filename).write_text(text)
            tracker.log_file(Path(tmp) / filename)
    tracker.log_dict({"table": table, "trials": trials}, "ablations.json")
    paper = trials.get(PAPER) or {}
    if "eval_10crop_top1_err" in paper:
        child = RunLogger(cfg.tracking.tracking_uri, cfg.tracking.experiment, run_name=TEN_CROP,
                          parent_run_id=tracker.run_id, tags={"ablation": TEN_CROP, "checkpoint": paper["checkpoint"]})
        child.log_metrics({k: v for k, v in paper.items() if k.startswith("eval_")}, step=int(paper.get("epochs") or 0))
        child.end()
