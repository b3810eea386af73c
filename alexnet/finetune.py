"""Fine-tuning an ImageNet network on a transfer dataset with Ray Train.

fc8 replaced by a new layer for the dataset's classes, the whole network trained: SGD with momentum, the
pre-trained layers at ``backbone_lr_mult`` of the new layer's learning rate, the paper's augmentation, binary
cross-entropy for VOC's multi-hot labels (difficult labels ignored); centre-crop test predictions saved with the
final weights. The trainer is ``alexnet.train.make_trainer``'s, as for training.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alexnet.augment import Augmentation
from alexnet.config import TransferConfig
from alexnet.features import load_backbone
from alexnet.protocols import DatasetIndex, ProtocolSplit, load_images, score_predictions
from pipelines.dataset import PreparedDataset

SCORES_FILE = "scores.npz"


FINETUNE_CHECKPOINT = "finetune.pt"


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Swap fc8 for a new ``num_classes``-way layer initialised like the paper's (N(0, 0.01^2), bias 0); returns it."""
    parent_path, _, name = model.tap_points["fc8"].rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    head = nn.Linear(old.in_features, num_classes)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    setattr(parent, name, head)
    return head


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on multi-hot targets where -1 marks an ignored (VOC "difficult") label."""
    mask = (targets >= 0).float()
    loss = F.binary_cross_entropy_with_logits(logits, targets.clamp_min(0).float(), weight=mask, reduction="sum")
    return loss / mask.sum().clamp_min(1.0)


def finetune_optimizer(model: nn.Module, head: nn.Module, *, lr: float, backbone_lr_mult: float, momentum: float,
                       weight_decay: float) -> torch.optim.SGD:
    """SGD with four groups: (pre-trained | new head) x (weights, decayed | biases, not decayed); the pre-trained
    groups carry ``lr_mult = backbone_lr_mult`` (``alexnet.train.set_lr`` applies it)."""
    new = {id(p) for p in head.parameters()}
    groups = []
    for is_new in (False, True):
        for decayed in (True, False):
            params = [p for p in model.parameters() if (id(p) in new) == is_new and (p.ndim > 1) == decayed]
            groups.append({"params": params, "weight_decay": weight_decay if decayed else 0.0,
                           "lr_mult": 1.0 if is_new else backbone_lr_mult})
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return optimizer


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, augmentation: Augmentation, *, device: torch.device,
            batch_size: int = 64, multilabel: bool = False) -> np.ndarray:
    """Centre-crop scores: softmax probabilities (multi-class) or logits (multi-label; AP needs only the order)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = augmentation.eval_center(torch.from_numpy(images[start:start + batch_size]).to(device))
        logits = model(x).float()
        out.append((logits if multilabel else logits.softmax(1)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def finetune_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Thin adapter: Ray Train context -> backbone with a new fc8 -> epochs of ``train.train_one_epoch`` -> test
    scores in the last checkpoint (rank 0)."""
    import ray.train
    import ray.train.torch

    from alexnet.data import Batch
    from alexnet.train import LRSchedule, epoch_seeds, restore_latest, seed_everything, set_lr, train_one_epoch, unwrap

    c = loop_config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    threads = max(1, int(c["cpus_per_worker"]))
    torch.set_num_threads(threads)
    if c["batch_size"] % world:
        raise ValueError(f"transfer.batch_size {c['batch_size']} is not divisible by {world} workers")
    per_worker = c["batch_size"] // world

    seed_everything(c["seed"])  # identical new heads on every rank
    backbone = load_backbone(c["checkpoint"], imagenet_stats=c["imagenet_stats"])
    model = backbone.model
    head = replace_head(model, c["num_classes"])
    augmentation = backbone.augmentation.to(device)
    model = ray.train.torch.prepare_model(model)
    optimizer = finetune_optimizer(model, head, lr=c["lr"], backbone_lr_mult=c["backbone_lr_mult"],
                                   momentum=c["momentum"], weight_decay=c["weight_decay"])
    schedule = LRSchedule(c["lr"], "step", step_epochs=list(c["step_epochs"]))
    state = restore_latest(FINETUNE_CHECKPOINT, model, optimizer, schedule)
    start_epoch, history = (state["epoch"], state["history"]) if state else (0, [])
    set_lr(optimizer, schedule.lr)

    # Every rank gets the same number of whole batches (DDP steps in lockstep).
    keys, targets = list(c["train_keys"]), np.asarray(c["train_targets"])
    per_rank = len(keys) // world
    mine = np.arange(rank, per_rank * world, world)
    dataset = PreparedDataset.from_dict(c["dataset"])  # opened by the driver: no manifest read here
    images, _ = load_images(dataset, [keys[i] for i in mine], threads=threads)
    targets = torch.as_tensor(targets[mine])
    loss_fn = masked_bce if c["multilabel"] else None
    generator = torch.Generator(device=device)

    for epoch in range(start_epoch, c["epochs"]):
        epoch_seeds(c["seed"], epoch, rank, generator)
        order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(c["seed"] + 31 * epoch))
        steps = len(mine) // per_worker if len(mine) >= per_worker else 1
        batches = (Batch(torch.from_numpy(images[order[i * per_worker:(i + 1) * per_worker].numpy()]),
                         targets[order[i * per_worker:(i + 1) * per_worker]]) for i in range(steps))
        sums = train_one_epoch(model, batches, optimizer, augmentation, device=device, generator=generator,
                               loss_fn=loss_fn, epoch=epoch)
        metrics = {"epoch": epoch + 1, "lr": schedule.lr, "train_loss": sums["loss_sum"] / max(1, sums["seen"]),
                   "images_per_s": sums["seen"] / max(1e-9, sums["seconds"])}
        if not c["multilabel"]:
            metrics["train_top1_err"] = 1 - sums["correct"] / max(1, sums["seen"])
        schedule.step(epoch, metrics["train_loss"])
        set_lr(optimizer, schedule.lr)
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "epoch": epoch + 1, "history": history,
                            "num_classes": c["num_classes"], "backbone": backbone.description},
                           Path(tmp) / FINETUNE_CHECKPOINT)
                if epoch + 1 == c["epochs"]:  # the test predictions travel with the final weights
                    test_images, _ = load_images(dataset, list(c["test_keys"]), threads=threads)
                    scores = predict(unwrap(model), test_images, augmentation, device=device,
                                     multilabel=c["multilabel"])
                    np.savez(Path(tmp) / SCORES_FILE, keys=np.array(c["test_keys"]), scores=scores)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def finetune(index: DatasetIndex, data: str | PreparedDataset, checkpoint: str, split: ProtocolSplit, cfg: TransferConfig, *,
             run_name: str, imagenet_stats: str | None = None) -> dict[str, Any]:
    """Fine-tune on ``split.train`` with Ray Train and score ``split.test``; rerunning ``run_name`` resumes."""
    from alexnet.train import checkpoint_uri_of, make_trainer, safe_torch_load

    if index.multilabel:  # multi-hot, with -1 where the label is "difficult" (ignored by the loss)
        targets = np.where(index.difficult, -1, index.labels).astype(np.float32)
    else:
        targets = index.labels
    loop_config = {
        "dataset": PreparedDataset.of(data).to_dict(), "checkpoint": checkpoint, "imagenet_stats": imagenet_stats,
        "num_classes": index.num_classes, "multilabel": index.multilabel,
        "train_keys": index.keys[split.train].tolist(), "train_targets": targets[split.train].tolist(),
        "test_keys": index.keys[split.test].tolist(),
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "backbone_lr_mult": cfg.backbone_lr_mult,
        "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "step_epochs": list(cfg.step_epochs),
        "seed": cfg.seed, "cpus_per_worker": cfg.cpus_per_worker,
    }
    trainer, storage_filesystem = make_trainer(
        finetune_loop_per_worker, loop_config, run_name=run_name, storage_path=cfg.storage_path,
        num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu, max_failures=2,
        checkpoints_to_keep=1)
    result = trainer.fit()
    uri = checkpoint_uri_of(result, storage_filesystem)
    if uri is None:
        raise RuntimeError(f"fine-tuning run {run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        saved = np.load(Path(d) / SCORES_FILE, allow_pickle=False)
        keys, scores = saved["keys"], saved["scores"]
        history = safe_torch_load(Path(d) / FINETUNE_CHECKPOINT, name=f"{uri}/{FINETUNE_CHECKPOINT}")["history"]
    if keys.tolist() != index.keys[split.test].tolist():
        raise RuntimeError(f"{uri}: its test predictions are for other images; delete the run folder and rerun")
    return {**score_predictions(index, split.test, scores), "scores": scores, "checkpoint": uri, "history": history,
            "train_images": len(split.train), "test_images": len(split.test)}
