"""Training AlexNet with the paper's recipe on Ray Train; read it top to bottom.

Krizhevsky et al. 2012, section 5: stochastic gradient descent, batch 128, momentum 0.9, weight decay 0.0005;
learning rate 0.01, divided by 10 when the validation error stopped improving (three times in all); about 90
epochs. The driver (``run_training``) builds a ``TorchTrainer``; ``train_loop_per_worker`` is a thin adapter over
``train_one_epoch`` and ``evaluate``, which are plain functions usable without Ray.

    alexnet train --config configs/smoke.yaml --data runs/smoke/prepared
    python -m alexnet.train --config configs/paper.yaml --data s3://bucket/imagenet-256   # for `ray job submit`
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
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
from alexnet.config import Config, add_train_arguments, config_from_args
from alexnet.model import build_model

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
PAPER_BATCH = 128


# --- the recipe ---------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum; weight decay on weights only (cuda-convnet, which the paper used, has none on biases).

    PyTorch's update ``v <- m v + g + wd w; w <- w - lr v`` equals the paper's
    ``v <- 0.9 v - 0.0005 lr w - lr g; w <- w + v`` while the learning rate is constant (``v_paper = -lr v``).
    """
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=momentum,
    )


@dataclass
class LRSchedule:
    """The paper's rule: divide the learning rate by 10 when the validation error stops improving, at most
    ``max_drops`` times; or fixed ``step_epochs``. Its state travels in checkpoints.

    Plateau drops wait for ``min_epochs_before`` completed epochs and for ``min_epochs_between`` epochs after the
    previous drop: a start that stalls at the chance loss would otherwise spend all three drops in its first
    ``3 * patience`` epochs and never learn (the paper's drops came after tens of epochs each)."""

    base_lr: float
    kind: str = "plateau"
    patience: int = 5
    threshold: float = 0.001
    max_drops: int = 3
    step_epochs: list[int] = field(default_factory=list)
    min_epochs_before: int = 0
    min_epochs_between: int = 0
    best: float = math.inf
    bad_epochs: int = 0
    drops: int = 0
    last_drop_epoch: int = 0  #: completed epochs at the latest drop

    @property
    def lr(self) -> float:
        return self.base_lr * 0.1**self.drops

    def step(self, epoch: int, val_error: float) -> bool:
        """Record the validation error after ``epoch`` (0-based); returns True when the rate was divided."""
        before = self.drops
        if self.kind == "step":
            self.drops = sum(1 for e in self.step_epochs if e <= epoch + 1)
        else:
            if val_error < self.best - self.threshold:
                self.best, self.bad_epochs = val_error, 0
            else:
                self.bad_epochs += 1
                done = epoch + 1
                waited = done >= (self.min_epochs_before if self.drops == 0
                                  else self.last_drop_epoch + self.min_epochs_between)
                if self.bad_epochs >= self.patience and self.drops < self.max_drops and waited:
                    self.drops += 1
                    self.bad_epochs = 0
                    self.last_drop_epoch = done
        return self.drops != before

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "drops": self.drops,
                "last_drop_epoch": self.last_drop_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs, self.drops = state["best"], state["bad_epochs"], state["drops"]
        self.last_drop_epoch = state.get("last_drop_epoch", 0)  # checkpoints from before the minimum spacing


def chance_loss_warning(train_loss: float, num_classes: int, *, tolerance: float = 0.01) -> str | None:
    """A warning when the training loss is still within ``tolerance`` (relative) of the chance loss
    ``ln(num_classes)``: the known stall of the paper's init (some reproductions never leave 6.91)."""
    chance = math.log(num_classes)
    if num_classes < 2 or abs(train_loss - chance) > tolerance * chance:
        return None
    return (f"TRAINING IS STALLED AT CHANCE: train loss {train_loss:.4f} is within {tolerance:.0%} of "
            f"ln({num_classes}) = {chance:.4f} after the first epoch; with the paper's init (biases 1) some "
            "reproductions never leave it: check data.pixel_scale (255 for the paper net), or try "
            "model.init=caffe or kaiming")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group at ``lr``, times the group's ``lr_mult`` where it has one (fine-tuning)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


# --- one epoch, evaluation -----------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
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


# --- checkpoints ---------------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The plain ``AlexNet`` inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def checkpoint_state(*, model, optimizer, schedule, epoch, config, num_classes, manifest_sha256, stats_sha256,
                     history, mlflow_run_id) -> dict[str, Any]:
    """Everything needed to resume or to evaluate, self-described (nanoGPT style)."""
    return {
        "model": unwrap(model).state_dict(),
        "num_classes": num_classes,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "epoch": epoch,  # completed epochs
        "rng": rng_state(),
        "config": config,
        "data_manifest_sha256": manifest_sha256,
        "stats_sha256": stats_sha256,
        "history": history,
        "mlflow_run_id": mlflow_run_id,
        "torch_version": str(torch.__version__),  # TorchVersion is a class weights_only=True does not load
    }


def rng_state() -> dict[str, Any]:
    """The RNG states of torch, numpy and Python in types ``torch.load(weights_only=True)`` loads: tensors, ints,
    floats, strings and tuples (numpy's state as an int64 tensor and ints, not an ndarray and numpy scalars)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": (int(version), tuple(int(x) for x in internal), None if gauss_next is None else float(gauss_next)),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_torch_load(source: str | Path | bytes, *, name: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain data only, never an object whose unpickling runs code.
    Anything else is refused with a one-line error naming ``name`` (the file's URI)."""
    import pickle

    f = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ValueError(f"refusing to load {name}: it holds objects other than tensors and plain data, whose "
                         f"unpickling could run code ({reason}); load only checkpoints written by this pipeline's "
                         "`alexnet train` (or torchvision state dicts)") from None


def load_checkpoint(uri: str) -> dict[str, Any]:
    """A checkpoint from a file or checkpoint folder URI (local or s3://)."""
    from pipelines import storage

    if not uri.endswith(".pt"):
        uri = storage.join(uri, CHECKPOINT_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} not found: pass a checkpoint folder written by `alexnet train` or its {CHECKPOINT_FILE}")
    return safe_torch_load(storage.read_bytes(uri), name=uri)


#: Ray Train's record of a run's checkpoints; a rerun of the same name resumes from its latest one.
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
#: Settings that change what the network is or what it learns from; a resumed run must keep them (with
#: ``train.resume=auto``). Every ``model.*`` key counts too.
RESUME_DATA_KEYS = ("train_split", "val_split", "normalize", "pixel_scale", "crop")


class ResumeRefused(ValueError):
    """A rerun of ``train.run_name`` would continue a checkpoint of other data or another model (not retried)."""


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The URI of the checkpoint folder a rerun of ``run_name`` under ``storage_path`` resumes from, or None."""
    from pipelines import storage

    run_dir = storage.join(storage.absolute(storage_path), run_name)
    folders = sorted({p.replace(os.sep, "/").split("/")[0] for p, _ in storage.list_files(run_dir)
                      if p.replace(os.sep, "/").endswith("/" + CHECKPOINT_FILE)})
    if not folders:
        return None
    latest = folders[-1]  # Ray names them by time: checkpoint_2026-01-31_12-00-00.123456
    snapshot = storage.join(run_dir, RAY_CHECKPOINT_SNAPSHOT)
    if storage.exists(snapshot):
        try:
            named = (storage.read_json(snapshot).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        except ValueError:
            named = None
        latest = named if named in folders else latest
    return storage.join(run_dir, latest)


def resume_differences(state: dict[str, Any], cfg: Config, *, manifest_sha256: str, num_classes: int) -> list[str]:
    """What differs between a checkpoint and the run about to continue it: the data (manifest sha256), the number
    of classes, ``model.*`` and the data settings of ``RESUME_DATA_KEYS``."""
    saved = checkpoint_config(state)  # a checkpoint from before data.pixel_scale reads as scale 1
    diffs = []
    if state.get("data_manifest_sha256") != manifest_sha256:
        diffs.append(f"data manifest sha256 {str(state.get('data_manifest_sha256'))[:12]} != {manifest_sha256[:12]} "
                     f"(now {cfg.data.data})")
    if state.get("num_classes") != num_classes:
        diffs.append(f"num_classes {state.get('num_classes')} != {num_classes}")
    was, now = saved.to_dict(), cfg.to_dict()
    keys = [("model", k) for k in now["model"]] + [("data", k) for k in RESUME_DATA_KEYS]
    diffs += [f"{s}.{k} {was[s].get(k)!r} != {now[s][k]!r}" for s, k in keys if was[s].get(k) != now[s][k]]
    return diffs


def check_resume(cfg: Config, *, manifest_sha256: str, num_classes: int) -> str | None:
    """Before any training: the checkpoint a rerun of ``train.run_name`` would resume (None: a fresh run), or
    ``ResumeRefused`` when it was made from other data or another model (``train.resume=auto``) or resuming is off
    (``never``). Its file is read with ``weights_only=True``: a crafted checkpoint fails here, not in a worker."""
    uri = latest_checkpoint(cfg.train.storage_path, cfg.train.run_name)
    if uri is None or cfg.train.resume == "force":
        return uri
    way_out = (f"choose a new train.run_name, or pass train.resume=force to continue {cfg.train.run_name!r} anyway")
    if cfg.train.resume == "never":
        raise ResumeRefused(f"train.run_name={cfg.train.run_name} already has a checkpoint ({uri}) and "
                            f"train.resume=never: choose a new train.run_name (or train.resume=auto to continue it)")
    diffs = resume_differences(load_checkpoint(uri), cfg, manifest_sha256=manifest_sha256, num_classes=num_classes)
    if diffs:
        raise ResumeRefused(f"refusing to resume train.run_name={cfg.train.run_name} from {uri}: it was trained "
                            f"with {'; '.join(diffs)}; {way_out}")
    return uri


def model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """The trained network of a checkpoint, on the CPU, in eval mode."""
    model = build_model(**_model_kwargs(checkpoint_config(state), num_classes=state["num_classes"]))
    model.load_state_dict(state["model"])
    return model.eval()


def checkpoint_config(state: dict[str, Any]) -> Config:
    """The resolved config a checkpoint was trained with."""
    raw = {name: dict(section) for name, section in (state.get("config") or {}).items()}
    # Checkpoints written before data.pixel_scale existed were trained on [0, 1] pixels.
    raw.setdefault("data", {}).setdefault("pixel_scale", 1)
    return Config.from_dict(raw)


def augmentation_for(cfg: Config, stats: dict[str, Any], mean_image: Any) -> Augmentation:
    """The input pipeline of ``cfg.data`` with the dataset's ``stats.json`` and mean image: the one definition of
    normalisation (pixel unit, mean image or channel, lighting) that training, evaluation and transfer share."""
    d = cfg.data
    return Augmentation.from_stats(stats, mean_image, normalize=d.normalize, lighting_std=d.lighting_std,
                                   crop=d.crop, pixel_scale=d.pixel_scale)


def _model_kwargs(cfg: Config, *, num_classes: int) -> dict[str, Any]:
    m = cfg.model
    return dict(variant=m.variant, num_classes=num_classes, lrn=m.lrn, overlap_pool=m.overlap_pool,
                groups=m.groups, dropout=m.dropout, init=m.init, activation=m.activation)


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


def _all_reduce(sums: dict[str, float], device: torch.device) -> dict[str, float]:
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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Thin adapter: Ray Train context -> model, data, optimiser -> epochs of train_one_epoch + evaluate."""
    import ray.train
    import ray.train.torch

    from alexnet.data import ShardReader
    from alexnet.tracking import RunLogger
    from pipelines import prepare, stats as stats_mod

    cfg = Config.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world} workers")
    per_worker_batch = cfg.train.batch_size // world

    manifest = prepare.load_manifest(cfg.data.data)
    stats, mean_image = stats_mod.load_stats(cfg.data.data)
    num_classes = cfg.model.num_classes or manifest["num_classes"]
    augmentation = augmentation_for(cfg, stats, mean_image).to(device)

    _seed_everything(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(**_model_kwargs(cfg, num_classes=num_classes))
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
    train_reader = ShardReader(cfg.data.data, cfg.data.train_split, batch_size=per_worker_batch, shuffle=True,
                               seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                               limit=cfg.data.limit_train or None, **common)
    val_reader = ShardReader(cfg.data.data, cfg.data.val_split, batch_size=per_worker_batch, shuffle=False,
                             limit=cfg.data.limit_val or None, **common)
    generator = torch.Generator(device=device)
    manifest_sha = prepare.manifest_hash(cfg.data.data)

    for epoch in range(start_epoch, cfg.train.epochs):
        # Per-epoch seeds: a resumed epoch draws exactly what an uninterrupted one would have drawn.
        _seed_everything(cfg.train.seed * 1_000_003 + epoch * 1009 + rank)
        generator.manual_seed(cfg.train.seed * 7919 + epoch * 104_729 + rank)
        train_reader.set_epoch(epoch)
        tr = _all_reduce(train_one_epoch(model, train_reader, optimizer, augmentation, device=device,
                                         generator=generator, bf16=cfg.train.bf16,
                                         channels_last=cfg.train.channels_last,
                                         label_smoothing=cfg.train.label_smoothing,
                                         log_every=cfg.train.log_every if rank == 0 else 0, epoch=epoch), device)
        va = errors(_all_reduce(evaluate(model, val_reader, augmentation, device=device, bf16=cfg.train.bf16,
                                         channels_last=cfg.train.channels_last), device))
        metrics = {
            "epoch": epoch + 1,
            "lr": schedule.lr,
            "train_loss": tr["loss_sum"] / max(1, tr["seen"]),
            "train_top1_err": 1 - tr["correct"] / max(1, tr["seen"]),
            "val_loss": va["loss"],
            "val_top1_err": va["top1_err"],
            "val_top5_err": va["top5_err"],
            "images_per_s": tr["seen"] / max(1e-9, tr["seconds"] / world),
        }
        if epoch == 0 and rank == 0:
            warn_if_stalled(metrics["train_loss"], num_classes, tracker)
        if schedule.step(epoch, va["top1_err"]):
            set_lr(optimizer, schedule.lr)
            if rank == 0:
                log.info("validation error stopped improving: learning rate now %g", schedule.lr)
        history.append(metrics)
        if tracker:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = checkpoint_state(model=model, optimizer=optimizer, schedule=schedule, epoch=epoch + 1,
                                         config=cfg.to_dict(), num_classes=num_classes,
                                         manifest_sha256=manifest_sha,
                                         stats_sha256=stats.get("mean_image_sha256"), history=history,
                                         mlflow_run_id=mlflow_run_id)
                torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                (Path(tmp) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics | {"mlflow_run_id": mlflow_run_id or ""}, checkpoint=ckpt)
        if rank == 0:
            log.info("epoch %d/%d: %s", epoch + 1, cfg.train.epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))

    if tracker:
        tracker.log_dict(cfg.to_dict(), "config.json")
        tracker.log_dict(history, "history.json")
        tracker.log_curves(history)
        if cfg.tracking.log_model:
            tracker.log_model(unwrap(model).cpu(), registered_model=cfg.tracking.registered_model or None)
        tracker.end()


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


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    checkpoint: str | None  # URI of the latest checkpoint folder
    mlflow_run_id: str | None
    history: list[dict[str, Any]]


def run_training(cfg: Config, *, ray_address: str | None = None, tracking: bool = True,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> TrainResult:
    """Train with Ray Train as ``cfg`` says; rerunning the same ``train.run_name`` resumes it."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from alexnet.tracking import git_commit, resolve_tracking_uri
    from pipelines import prepare, storage
    from pipelines.rayutil import check_resources, ensure_ray

    if not cfg.data.data:
        raise ValueError("no dataset: pass --data URI (a folder or s3:// prefix written by `alexnet prepare`)")
    cfg.data.data = storage.absolute(cfg.data.data)
    manifest = prepare.load_manifest(cfg.data.data)  # fail here, clearly, rather than in every worker
    # Refused here, before fit(): a worker's error would be retried train.max_failures times.
    manifest_sha256 = prepare.manifest_hash(cfg.data.data)
    resumes = check_resume(cfg, manifest_sha256=manifest_sha256,
                           num_classes=cfg.model.num_classes or manifest["num_classes"])
    if resumes:
        log.info("train.run_name=%s resumes from %s", cfg.train.run_name, resumes)
    ensure_ray(ray_address)
    check_resources("train", num_workers=cfg.train.num_workers, cpus_per_worker=cfg.train.cpus_per_worker,
                    use_gpu=cfg.train.use_gpu)

    storage_path, storage_filesystem = ray_storage(cfg.train.storage_path)
    loop_config: dict[str, Any] = {"config": cfg.to_dict(), "parent_run_id": parent_run_id,
                                   "tags": {"git_commit": git_commit(),
                                            "data_manifest_sha256": manifest_sha256, **(tags or {})}}
    if tracking:
        loop_config["tracking_uri"] = resolve_tracking_uri(cfg.tracking.tracking_uri or None)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            worker_runtime_env=storage.worker_env() or None,
        ),
    )
    result = trainer.fit()
    checkpoint_uri = checkpoint_uri_of(result, storage_filesystem)
    history = []
    if checkpoint_uri:
        history = load_checkpoint(checkpoint_uri).get("history", [])
    metrics = dict(result.metrics or {})
    return TrainResult(metrics, checkpoint_uri, metrics.get("mlflow_run_id") or None, history)


# --- entry point -----------------------------------------------------------------------------------------------------


def run_from_args(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run_training(cfg, ray_address=args.ray_address, tracking=args.tracking)
    print(json.dumps({"checkpoint": result.checkpoint, "mlflow_run_id": result.mlflow_run_id,
                      "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.redact import redact_handlers

    redact_handlers()  # no credential of a URI in a log line
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
