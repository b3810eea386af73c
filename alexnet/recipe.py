"""The paper's optimisation recipe (Krizhevsky et al. 2012, section 5): SGD with momentum 0.9 and weight decay
0.0005, the learning rate divided by 10 when the validation error stops improving; and the warning for the known
stall at the chance loss. Pure functions and state, no Ray."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


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
