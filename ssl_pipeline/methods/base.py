"""The shallow base every pretraining method shares: optimizer, schedule, logging.

A method is a Lightning "system" (Lightning's systems-vs-models split): it receives a backbone,
composes lightly's heads and losses around it, and implements `training_loss`. Its typed
constructor arguments (after `backbone`, `optim` and `num_classes`) are its recipe settings:
settings.py turns them into the strict `method.<name>` block of the recipe.

When the views are made on the training device (`views.augment_on: device`), the batch arrives
as uint8 images and `on_after_batch_transfer` turns it into the `num_views` augmented views
the method's `training_loss` takes, on the device, before the (autocast) training step.
"""

from __future__ import annotations

import math
import typing
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.models.utils import get_weight_decay_parameters
from lightly.utils.lars import LARS
from lightly.utils.scheduler import cosine_warmup_schedule
from torch import nn

from ssl_pipeline.errors import SSLPipelineError

if typing.TYPE_CHECKING:
    from ssl_pipeline.data.device_views import DeviceViews

# pretrain.on_nonfinite_loss=skip returns None from training_step on purpose.
warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops (exit status 1), its checkpoints kept."""


@dataclass(frozen=True)
class OptimSettings:
    """Resolved optimizer and schedule; `lr` is the effective (batch-scaled) learning rate."""

    optimizer: str = "sgd"
    lr: float = 0.06
    weight_decay: float = 5e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.0
    epochs: int = 100
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.0


class PretrainMethod(pl.LightningModule):
    """Backbone + method-specific heads and loss, trained by the Lightning Trainer."""

    needs_labels = False  # True for methods that train on labels (supervised)
    num_views = 2  # augmented views per image that training_loss takes (1: a plain tensor)

    def __init__(self, backbone: nn.Module, optim: OptimSettings):
        super().__init__()
        self.backbone = backbone
        self.optim = optim
        # Set by the pretraining stage when the views are made on the training device. A plain
        # attribute, not a submodule: it has no state, so checkpoints do not depend on it.
        self.device_views: DeviceViews | None = None
        # pretrain.on_nonfinite_loss: "stop" raises NonFiniteLoss, "skip" drops the step.
        self.on_nonfinite_loss = "stop"
        self.skipped_steps = 0  # kept in checkpoints, so a resumed run keeps counting
        self.warnings: list[str] = []  # for the results and the report (e.g. SimSiam collapse)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images `(B, C, H, W)` on the device -> the views `training_loss` expects."""
        images, labels = batch
        if self.device_views is None or not torch.is_tensor(images) or images.dtype != torch.uint8:
            return batch
        views = self.device_views(images)  # num_views tensors (B, C, S, S)
        return [views if self.num_views > 1 else views[0], labels]

    def training_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch and extra scalars to log (without the `train/` prefix)."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss, extras = self.training_loss(batch)
        if self._any_process_nonfinite(loss):
            return self._nonfinite_step(loss, batch_idx)
        batch_size = batch[1].shape[0]
        # sync_dist: the epoch loss is the mean over all processes, not rank 0's share
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch_size, sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        for name, value in extras.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=batch_size,
                     sync_dist=True)
        return loss

    def _any_process_nonfinite(self, loss: torch.Tensor) -> bool:
        bad = not bool(torch.isfinite(loss.detach()).all())
        # Every process must take the same branch, or a DDP all-reduce would wait forever.
        return bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))

    def _nonfinite_step(self, loss: torch.Tensor, batch_idx: int) -> None:
        trainer = self.trainer
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch + 1}, batch {batch_idx})"
        if self.on_nonfinite_loss == "skip":
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            return  # None: Lightning skips backward and the optimizer step
        raise NonFiniteLoss(
            f"the training loss is {loss.detach().float().mean().item()} at {where}; the "
            "checkpoints in checkpoints/ are from before it. Lower pretrain.lr, set "
            "trainer.gradient_clip_val, try trainer.precision=32, or set "
            "pretrain.on_nonfinite_loss=skip to drop such steps (counted in the report)"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_nonfinite_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_nonfinite_steps", 0))

    # ------------------------------------------------------------------ optimizer

    def param_groups(self) -> list[dict[str, Any]]:
        """Weight decay on weights only: norm layers and biases are not decayed (SimCLR, BYOL)."""
        decay, no_decay = get_weight_decay_parameters([self])
        return [
            {"name": "decay", "params": decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [g for g in self.param_groups() if g["params"]]
        optimizer = build_optimizer(groups, self.optim)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        # at most the whole run (a smoke run shorter than the recipe's warm-up is all warm-up)
        warmup = min(total_steps, int(total_steps * self.optim.warmup_epochs / self.optim.epochs))
        schedule = partial(lr_factor, total=total_steps, warmup=warmup, optim=self.optim)
        # Groups marked `fixed_lr` (SimSiam's predictor) keep their lr: no warm-up, no decay.
        lambdas = [(lambda _: 1.0) if g.get("fixed_lr") else schedule for g in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(step: int, total: int, warmup: int, optim: OptimSettings) -> float:
    """Multiplier of the effective lr at `step`: linear warm-up, then cosine or constant.

    >>> settings = OptimSettings(min_lr_ratio=0.1)
    >>> [round(lr_factor(s, total=10, warmup=2, optim=settings), 3) for s in (0, 1, 2, 10)]
    [0.5, 1.0, 1.0, 0.1]
    """
    step = min(step, total)  # Lightning may step once more after the last batch
    if optim.scheduler == "constant":
        return min(1.0, (step + 1) / warmup) if warmup else 1.0
    return cosine_warmup_schedule(
        step=step,
        max_steps=total,
        start_value=1.0,
        end_value=optim.min_lr_ratio,
        warmup_steps=warmup,
        warmup_start_value=0.0,
    )


def build_optimizer(groups: list[dict[str, Any]], optim: OptimSettings) -> torch.optim.Optimizer:
    kwargs = {"lr": optim.lr, "weight_decay": optim.weight_decay}
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=optim.momentum, **kwargs)
    if optim.optimizer == "lars":
        # lightly's LARS skips the trust ratio for groups with weight_decay 0 (norms, biases).
        return LARS(groups, momentum=optim.momentum, **kwargs)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, betas=optim.betas, **kwargs)
    raise SSLPipelineError(f"pretrain.optimizer: unknown {optim.optimizer!r}; use sgd, lars or adamw")


def effective_lr(base_lr: float, batch_size: int, reference: int, rule: str) -> float:
    """Learning rate scaled by the global batch size.

    >>> effective_lr(0.05, 512, 256, "linear"), effective_lr(0.075, 4096, 1, "sqrt")
    (0.1, 4.8)
    """
    ratio = batch_size / reference
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]
