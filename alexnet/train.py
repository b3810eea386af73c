"""Training AlexNet with the paper's recipe on Ray Train; read it top to bottom.

Krizhevsky et al. 2012, section 5: stochastic gradient descent, batch 128, momentum 0.9, weight decay 0.0005;
learning rate 0.01, divided by 10 when the validation error stopped improving (three times in all); about 90
epochs (the optimiser and schedule: ``alexnet.recipe``; checkpoints and resume checks: ``alexnet.checkpoints``).
The driver (``run_training``) opens the dataset once and builds the trainer with ``make_trainer`` (fine-tuning uses
it too); ``train_loop_per_worker`` is ``setup_worker``, then per epoch ``run_epoch`` (``train_one_epoch`` and
``evaluate``, plain functions usable without Ray) and ``save_checkpoint``, then ``finish_worker``.

    alexnet train --config configs/smoke.yaml --data runs/smoke/prepared
    python -m alexnet.train --config configs/paper.yaml --data s3://bucket/imagenet-256   # for `ray job submit`
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alexnet.augment import Augmentation
from alexnet.checkpoints import (  # noqa: F401 - re-exported: the checkpoint API's import path stays alexnet.train
    CHECKPOINT_FILE, RAY_CHECKPOINT_SNAPSHOT, RESUME_DATA_KEYS, ResumeRefused, check_resume, checkpoint_config,
    checkpoint_state, latest_checkpoint, load_checkpoint, model_from_checkpoint, model_kwargs, resume_differences,
    read_checkpoint_meta, read_sidecar, rng_state, safe_torch_load, save_checkpoint_files, set_rng_state, unwrap)
from alexnet.config import Config
from alexnet.model import build_model
from alexnet.recipe import LRSchedule, build_optimizer, chance_loss_warning, set_lr  # noqa: F401 - re-exported
from pipelines.dataset import PreparedDataset

log = logging.getLogger(__name__)

PAPER_BATCH = 128


# --- one step ------------------------------------------------------------------------------------------------------


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


# --- one epoch, evaluation -----------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators seeded from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_one_epoch(
    model: nn.Module,
    batches,
    optimizer: torch.optim.Optimizer,
    augmentation: Augmentation,
    *,
    device: torch.device,
    generator: torch.Generator,
    bf16: bool = False,
    channels_last: bool = False,
    label_smoothing: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    log_every: int = 0,
    epoch: int = 0,
) -> dict[str, float]:
    """One pass over ``batches`` (an iterable of ``Batch`` with uint8 images); local sums, not all-reduced.

    The loss is cross-entropy on class indices unless ``loss_fn(logits, labels)`` says otherwise (fine-tuning on
    multi-label VOC passes binary cross-entropy on multi-hot labels; ``correct`` then stays 0)."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    started = time.perf_counter()
    for step, batch in enumerate(batches):
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        x = augmentation.train(images, generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            if loss_fn is None:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            else:
                loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.shape[0]
        loss_sum += float(loss.detach()) * n
        if labels.ndim == 1:
            correct += int((logits.detach().argmax(1) == labels).sum())
        seen += n
        if log_every and (step + 1) % log_every == 0:
            rate = seen / (time.perf_counter() - started)
            log.info("epoch %d step %d: loss %.4f, %.1f images/s", epoch + 1, step + 1, loss_sum / seen, rate)
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "seconds": time.perf_counter() - started}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches,
    augmentation: Augmentation,
    *,
    device: torch.device,
    crops: int = 1,
    bf16: bool = False,
    channels_last: bool = False,
    on_scores: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Sums of loss, top-1 and top-5 hits over ``batches`` with the centre crop (``crops=1``) or the paper's ten
    crops (``crops=10``: softmax averaged over four corners, centre and their reflections). ``on_scores(scores,
    labels)`` sees each batch's scores (per-class tables: ``alexnet.evaluate.ClassTally``)."""
    from alexnet.augment import predict_ten_crop

    model.eval()
    loss_sum, top1, top5, seen = 0.0, 0, 0, 0
    for batch in batches:
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if crops == 10:
                probs = predict_ten_crop(model, images, augmentation).float()
                loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
                scores = probs
            elif crops == 1:
                x = augmentation.eval_center(images)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                scores = model(x).float()
                loss = F.cross_entropy(scores, labels, reduction="sum")
            else:
                raise ValueError(f"crops must be 1 or 10, not {crops}")
        c1, c5 = topk_correct(scores, labels)
        if on_scores is not None:
            on_scores(scores, labels)
        loss_sum += float(loss)
        top1, top5, seen = top1 + c1, top5 + c5, seen + labels.shape[0]
    return {"loss_sum": loss_sum, "top1": top1, "top5": top5, "seen": seen}


def errors(sums: dict[str, float]) -> dict[str, float]:
    n = max(1, sums["seen"])
    # misses / n, as the ILSVRC devkit's eval_flat.m (1 - hits / n can differ in the last bit)
    return {"loss": sums["loss_sum"] / n, "top1_err": (sums["seen"] - sums["top1"]) / n,
            "top5_err": (sums["seen"] - sums["top5"]) / n}



def augmentation_for(cfg: Config, stats: dict[str, Any], mean_image: Any) -> Augmentation:
    """The input pipeline of ``cfg.data`` with the dataset's ``stats.json`` and mean image: the one definition of
    normalisation (pixel unit, mean image or channel, lighting) that training, evaluation and transfer share."""
    d = cfg.data
    return Augmentation.from_stats(stats, mean_image, normalize=d.normalize, lighting_std=d.lighting_std,
                                   crop=d.crop, pixel_scale=d.pixel_scale)


def warn_if_stalled(train_loss: float, num_classes: int, tracker: Any | None) -> str | None:
    """After the first epoch: :func:`chance_loss_warning` in the log, and in MLflow as the tag
    ``warning.loss_at_chance`` and the metric ``loss_at_chance`` = 1 (so a stalled run shows in the runs table)."""
    stalled = chance_loss_warning(train_loss, num_classes)
    if stalled:
        log.warning(stalled)
        if tracker:
            tracker.set_tags({"warning.loss_at_chance": stalled})
            tracker.log_metrics({"loss_at_chance": 1.0}, step=1)
    return stalled


# --- the Ray Train worker --------------------------------------------------------------------------------------------


def all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """``sums`` added over all ranks (unchanged without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return sums
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def restore_latest(filename: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                   schedule: LRSchedule) -> dict[str, Any] | None:
    """Load the Ray Train run's latest checkpoint (``filename`` in it) into model, optimizer and schedule; returns
    the saved state, or None when the run starts fresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        state = safe_torch_load(Path(d) / filename, name=f"{checkpoint.path}/{filename}")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state


def epoch_seeds(seed: int, epoch: int, rank: int, generator: torch.Generator) -> None:
    """Per-epoch seeds: a resumed epoch draws exactly what an uninterrupted one would have drawn."""
    seed_everything(seed * 1_000_003 + epoch * 1009 + rank)
    generator.manual_seed(seed * 7919 + epoch * 104_729 + rank)


@dataclass
class WorkerRun:
    """What a training worker holds from one epoch to the next."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    augmentation: Augmentation
    train_reader: Any
    val_reader: Any
    generator: torch.Generator
    num_classes: int
    manifest_sha256: str
    stats_sha256: str | None
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    tracker: Any | None = None


def setup_worker(loop_config: dict[str, Any]) -> WorkerRun:
    """Ray Train context -> model, optimiser, schedule (restored when resuming), data readers and the tracker."""
    import ray.train
    import ray.train.torch

    from alexnet.data import ShardReader
    from alexnet.tracking import RunLogger

    cfg = Config.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world} workers")
    per_worker_batch = cfg.train.batch_size // world

    # opened once by the driver; a loop config without it (run by hand) opens it here
    dataset = (PreparedDataset.from_dict(loop_config["dataset"]) if loop_config.get("dataset")
               else PreparedDataset.open(cfg.data.data, stats=True))
    stats = dataset.stats
    num_classes = cfg.model.num_classes or dataset.num_classes
    augmentation = augmentation_for(cfg, stats, dataset.mean_image()).to(device)

    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(**model_kwargs(cfg, num_classes=num_classes))
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    if cfg.train.compile:
        model = torch.compile(model)
    lr = cfg.train.lr * (cfg.train.batch_size / PAPER_BATCH if cfg.train.lr_scaling == "linear" else 1.0)
    optimizer = build_optimizer(model, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    schedule = LRSchedule(lr, cfg.train.schedule, cfg.train.patience, cfg.train.plateau_threshold,
                          cfg.train.max_lr_drops, list(cfg.train.step_epochs),
                          cfg.train.min_epochs_before_drop, cfg.train.min_epochs_between_drops)

    start_epoch, history, mlflow_run_id = 0, [], loop_config.get("mlflow_run_id")
    state = restore_latest(CHECKPOINT_FILE, model, optimizer, schedule)
    if state:
        start_epoch, history = state["epoch"], state["history"]
        mlflow_run_id = state.get("mlflow_run_id") or mlflow_run_id
        if rank == 0:
            log.info("resuming %s after epoch %d", cfg.train.run_name, start_epoch)
    set_lr(optimizer, schedule.lr)

    tracker = None
    if rank == 0 and loop_config.get("tracking_uri"):
        tracker = RunLogger(loop_config["tracking_uri"], cfg.tracking.experiment, run_name=cfg.train.run_name,
                            run_id=mlflow_run_id, parent_run_id=loop_config.get("parent_run_id"),
                            tags=loop_config.get("tags"), system_metrics=cfg.tracking.system_metrics)
        mlflow_run_id = tracker.run_id
        training_params = {k: v for k, v in cfg.flat().items() if not k.startswith("transfer.")}
        tracker.log_params(training_params | {"derived.num_classes": num_classes, "derived.world_size": world,
                                              "derived.per_worker_batch": per_worker_batch, "derived.lr": lr})

    common = dict(rank=rank, world_size=world, decode_threads=cfg.data.decode_threads or None,
                  pin_memory=device.type == "cuda")
    train_reader = ShardReader(dataset, cfg.data.train_split, batch_size=per_worker_batch, shuffle=True,
                               seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                               limit=cfg.data.limit_train or None, **common)
    val_reader = ShardReader(dataset, cfg.data.val_split, batch_size=per_worker_batch, shuffle=False,
                             limit=cfg.data.limit_val or None, **common)
    return WorkerRun(cfg=cfg, rank=rank, world=world, device=device, model=model, optimizer=optimizer,
                     schedule=schedule, augmentation=augmentation, train_reader=train_reader, val_reader=val_reader,
                     generator=torch.Generator(device=device), num_classes=num_classes,
                     manifest_sha256=dataset.manifest_sha256,
                     stats_sha256=stats.get("mean_image_sha256"), start_epoch=start_epoch, history=history,
                     mlflow_run_id=mlflow_run_id, tracker=tracker)


def run_epoch(run: WorkerRun, epoch: int) -> dict[str, Any]:
    """One epoch of ``train_one_epoch`` and ``evaluate`` (all-reduced), the schedule's step, the metrics logged."""
    cfg, device = run.cfg, run.device
    epoch_seeds(cfg.train.seed, epoch, run.rank, run.generator)
    run.train_reader.set_epoch(epoch)
    tr = all_reduce_sums(train_one_epoch(run.model, run.train_reader, run.optimizer, run.augmentation, device=device,
                                         generator=run.generator, bf16=cfg.train.bf16,
                                         channels_last=cfg.train.channels_last,
                                         label_smoothing=cfg.train.label_smoothing,
                                         log_every=cfg.train.log_every if run.rank == 0 else 0, epoch=epoch), device)
    va = errors(all_reduce_sums(evaluate(run.model, run.val_reader, run.augmentation, device=device,
                                         bf16=cfg.train.bf16, channels_last=cfg.train.channels_last), device))
    metrics = {
        "epoch": epoch + 1,
        "lr": run.schedule.lr,
        "train_loss": tr["loss_sum"] / max(1, tr["seen"]),
        "train_top1_err": 1 - tr["correct"] / max(1, tr["seen"]),
        "val_loss": va["loss"],
        "val_top1_err": va["top1_err"],
        "val_top5_err": va["top5_err"],
        "images_per_s": tr["seen"] / max(1e-9, tr["seconds"] / run.world),
    }
    if epoch == 0 and run.rank == 0:
        warn_if_stalled(metrics["train_loss"], run.num_classes, run.tracker)
    if run.schedule.step(epoch, va["top1_err"]):
        set_lr(run.optimizer, run.schedule.lr)
        if run.rank == 0:
            log.info("validation error stopped improving: learning rate now %g", run.schedule.lr)
    run.history.append(metrics)
    if run.tracker:
        run.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
    return metrics


def save_checkpoint(run: WorkerRun, metrics: dict[str, Any]) -> None:
    """Report the epoch to Ray Train with a checkpoint written by rank 0 (``checkpoint.pt``, its ``meta.json``
    sidecar and ``config.json``)."""
    import ray.train

    cfg, epoch = run.cfg, metrics["epoch"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if run.rank == 0:
            state = checkpoint_state(model=run.model, optimizer=run.optimizer, schedule=run.schedule, epoch=epoch,
                                     config=cfg.to_dict(), num_classes=run.num_classes,
                                     manifest_sha256=run.manifest_sha256, stats_sha256=run.stats_sha256,
                                     history=run.history, mlflow_run_id=run.mlflow_run_id)
            save_checkpoint_files(state, tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics | {"mlflow_run_id": run.mlflow_run_id or ""}, checkpoint=ckpt)
    if run.rank == 0:
        log.info("epoch %d/%d: %s", epoch, cfg.train.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))


def finish_worker(run: WorkerRun) -> None:
    """Rank 0: the config, history, curves and (``tracking.log_model``) the model in MLflow."""
    if run.tracker:
        run.tracker.log_dict(run.cfg.to_dict(), "config.json")
        run.tracker.log_dict(run.history, "history.json")
        run.tracker.log_curves(run.history)
        if run.cfg.tracking.log_model:
            run.tracker.log_model(unwrap(run.model).cpu(), registered_model=run.cfg.tracking.registered_model or None)
        run.tracker.end()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Thin adapter: set up, then epochs of ``train_one_epoch`` + ``evaluate``, each ending in a checkpoint."""
    run = setup_worker(loop_config)
    for epoch in range(run.start_epoch, run.cfg.train.epochs):
        save_checkpoint(run, run_epoch(run, epoch))
    finish_worker(run)


# --- the driver ----------------------------------------------------------------------------------------------------


def ray_storage(uri: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` from a folder or ``s3://`` URI (pyarrow's
    S3 filesystem gets the endpoint explicitly: it ignores ``AWS_ENDPOINT_URL``)."""
    from pipelines import storage

    path = storage.absolute(uri)
    if storage.is_s3(path):
        fs, path = storage.filesystem(path)
        return path, fs
    return path, None


def checkpoint_uri_of(result: Any, storage_filesystem: Any) -> str | None:
    """The URI of a Ray Train result's latest checkpoint (``s3://`` when the storage is S3)."""
    if result.checkpoint is None:
        return None
    return result.checkpoint.path if storage_filesystem is None else f"s3://{result.checkpoint.path}"


def make_trainer(loop_per_worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], *, run_name: str,
                 storage_path: str, num_workers: int, cpus_per_worker: float, use_gpu: bool, max_failures: int,
                 checkpoints_to_keep: int) -> tuple[Any, Any]:
    """``(TorchTrainer, storage_filesystem)`` of one Ray Train run, for training and fine-tuning alike: ``nccl``
    on GPUs else ``gloo``, ``num_workers`` workers of ``cpus_per_worker`` CPUs (and a GPU each with ``use_gpu``),
    checkpoints under ``storage_path/run_name`` (a rerun of the same name resumes), the storage's credentials
    forwarded to the workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines import storage

    path, storage_filesystem = ray_storage(storage_path)
    trainer = TorchTrainer(
        loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoints_to_keep),
            worker_runtime_env=storage.worker_env() or None,
        ),
    )
    return trainer, storage_filesystem


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    checkpoint: str | None  # URI of the latest checkpoint folder
    mlflow_run_id: str | None
    history: list[dict[str, Any]]


def run_training(cfg: Config, *, ray_address: str | None = None, tracking: bool = True,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 dataset: PreparedDataset | None = None) -> TrainResult:
    """Train with Ray Train as ``cfg`` says; rerunning the same ``train.run_name`` resumes it. ``dataset``: the
    prepared dataset ``data.data`` already opened (default: opened here); the workers get it, not a URI to read."""
    from alexnet.tracking import git_commit, resolve_tracking_uri
    from pipelines import storage
    from pipelines.rayutil import check_resources, ensure_ray

    if dataset is not None:
        cfg.data.data = cfg.data.data or dataset.uri
    if not cfg.data.data:
        raise ValueError("data.data is empty: set it to a prepared dataset, a folder or s3:// prefix written by "
                         "`alexnet prepare` (on the command line: --data URI)")
    cfg.data.data = storage.absolute(cfg.data.data)
    if dataset is None or storage.absolute(dataset.uri) != cfg.data.data:
        dataset = PreparedDataset.open(cfg.data.data)  # fail here, clearly, rather than in every worker
    # Refused here, before fit(): a worker's error would be retried train.max_failures times.
    resumes = check_resume(cfg, manifest_sha256=dataset.manifest_sha256,
                           num_classes=cfg.model.num_classes or dataset.num_classes)
    if resumes:
        log.info("train.run_name=%s resumes from %s", cfg.train.run_name, resumes)
    dataset = dataset.with_stats()
    manifest_sha256 = dataset.manifest_sha256
    ensure_ray(ray_address)
    check_resources("train", num_workers=cfg.train.num_workers, cpus_per_worker=cfg.train.cpus_per_worker,
                    use_gpu=cfg.train.use_gpu)

    loop_config: dict[str, Any] = {"config": cfg.to_dict(), "dataset": dataset.to_dict(),
                                   "parent_run_id": parent_run_id,
                                   "tags": {"git_commit": git_commit(),
                                            "data_manifest_sha256": manifest_sha256, **(tags or {})}}
    if tracking:
        loop_config["tracking_uri"] = resolve_tracking_uri(cfg.tracking.tracking_uri or None)
    t = cfg.train
    trainer, storage_filesystem = make_trainer(
        train_loop_per_worker, loop_config, run_name=t.run_name, storage_path=t.storage_path,
        num_workers=t.num_workers, cpus_per_worker=t.cpus_per_worker, use_gpu=t.use_gpu,
        max_failures=t.max_failures, checkpoints_to_keep=t.checkpoints_to_keep)
    result = trainer.fit()
    checkpoint_uri = checkpoint_uri_of(result, storage_filesystem)
    history = []
    if checkpoint_uri:
        history = read_checkpoint_meta(checkpoint_uri).get("history") or []
    metrics = dict(result.metrics or {})
    return TrainResult(metrics, checkpoint_uri, metrics.get("mlflow_run_id") or None, history)


if __name__ == "__main__":  # `python -m alexnet.train`, for `ray job submit`: the options of `alexnet train`
    from alexnet.cli import train_main

    sys.exit(train_main())
