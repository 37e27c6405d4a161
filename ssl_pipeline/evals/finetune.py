"""Fine-tuning: the whole network from an initialization, a fresh linear head, a lower
backbone learning rate. The epoch is selected on validation top-1 and reported once on test.

With `frozen`, the same loop is the papers' classic linear probe: the backbone stays frozen in
eval mode (BatchNorm on its running statistics) while only the head trains, on augmented
images (SimSiam's and MoCo's protocol: LARS, 90 epochs, random resized crops and flips).

The best weights are kept as a copy (not a reference: MedMNIST's reference script kept a
reference to its "best" model and so saved the last epoch).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from ssl_pipeline.budget import time_ran_out
from ssl_pipeline.evals.metrics import classification_metrics, multi_label_metrics
from ssl_pipeline.methods.base import OptimSettings, build_optimizer, lr_factor


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 10
    optimizer: str = "adamw"
    lr: float = 1e-3
    backbone_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    max_minutes: float | None = None
    frozen: bool = False  # only the head trains; the backbone stays in eval mode


class FineTuner(pl.LightningModule):
    def __init__(self, backbone: nn.Module, num_classes: int, settings: FinetuneSettings,
                 multi_label: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.settings = settings
        # multi-label: one binary cross-entropy per label; the epoch is chosen on val AUC
        self.multi_label = multi_label
        self.criterion = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()
        self.val_correct: list[torch.Tensor] = []
        self.val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if settings.frozen:
            self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.settings.frozen:
            # BatchNorm on its running statistics, whatever mode Lightning left the modules
            # in (it saves and restores each submodule's mode around validation)
            self.backbone.eval()
            with torch.no_grad():
                features = self.backbone(x)
            return self.head(features.float())
        return self.head(self.backbone(x))  # (B, num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self(x), y.float() if self.multi_label else y)
        self.log("finetune/loss", loss, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if self.multi_label:
            self.val_outputs.append((self(x).float().cpu(), y.cpu()))
        else:
            self.val_correct.append((self(x).argmax(1) == y).float())

    def on_validation_epoch_end(self):
        if self.multi_label:  # the selection score is the val AUC (logged under val_top1)
            scores, labels = (torch.cat(t).numpy() for t in zip(*self.val_outputs))
            auc = multi_label_metrics(scores, labels)["auc"] if len(labels) else None
            self.log("finetune/val_top1", float(auc or 0.0))
            self.val_outputs.clear()
            return
        correct = torch.cat(self.val_correct) if self.val_correct else torch.zeros(1)
        self.log("finetune/val_top1", correct.mean())
        self.val_correct.clear()

    def configure_optimizers(self):
        s = self.settings
        groups = [{"params": self.head.parameters(), "lr": s.lr}]
        if not s.frozen:
            groups.insert(0, {"params": self.backbone.parameters(), "lr": s.lr * s.backbone_lr_ratio})
        if s.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
        else:  # sgd or lars, momentum 0.9
            optimizer = build_optimizer(groups, OptimSettings(optimizer=s.optimizer, lr=s.lr,
                                                              weight_decay=s.weight_decay))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = OptimSettings(epochs=s.epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, 0, schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class KeepBest(pl.Callback):
    """A copy of the weights of the epoch with the best validation top-1: the whole network's
    when it trains, the head's alone when the backbone is frozen (it cannot change)."""

    def __init__(self):
        self.best_score = -1.0
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[float] = []

    @staticmethod
    def kept(model: FineTuner) -> nn.Module:
        return model.head if model.settings.frozen else model

    def on_validation_end(self, trainer, pl_module):  # after the module logged val_top1
        score = float(trainer.callback_metrics["finetune/val_top1"])
        self.history.append(score)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, trainer.current_epoch + 1
            self.best_state = copy.deepcopy(self.kept(pl_module).state_dict())

    def restore(self, model: FineTuner) -> None:
        """The best epoch's weights back into `model` (nothing kept: left as trained)."""
        if self.best_state is not None:  # None: the time budget ended training before any validation
            self.kept(model).load_state_dict(self.best_state)


def finetune(
    backbone: nn.Module,
    num_classes: int,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    test_loader: torch.utils.data.DataLoader,
    settings: FinetuneSettings,
    trainer_kwargs: dict,
    class_names: list[str] | None = None,
    multi_label: bool = False,
) -> dict:
    """Fine-tune `backbone` (modified in place) and report test metrics of the best epoch."""
    model, fit = fit_finetuner(backbone, num_classes, train_loader, val_loader, settings,
                               trainer_kwargs, multi_label)
    return {**held_out_metrics(model, test_loader, class_names), **fit}


def fit_finetuner(
    backbone: nn.Module,
    num_classes: int,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    settings: FinetuneSettings,
    trainer_kwargs: dict,
    multi_label: bool = False,
) -> tuple[FineTuner, dict]:
    """Fine-tune `backbone` (modified in place): the model, holding its best validation epoch's
    weights, and how the training went. The test split is not touched."""
    model = FineTuner(backbone, num_classes, settings, multi_label)
    keep = KeepBest()
    max_time = None if settings.max_minutes is None else {"minutes": settings.max_minutes}
    trainer_kwargs = dict(trainer_kwargs)
    callbacks = [keep, *trainer_kwargs.pop("callbacks", [])]
    trainer = pl.Trainer(max_epochs=settings.epochs, max_time=max_time, callbacks=callbacks,
                         num_sanity_val_steps=0, **trainer_kwargs)
    start = time.time()
    trainer.fit(model, train_loader, val_loader)
    seconds = time.time() - start
    keep.restore(model)
    return model, {
        "val_top1": keep.best_score,
        "best_epoch": keep.best_epoch,
        "val_top1_by_epoch": keep.history,
        "epochs_run": trainer.current_epoch,
        "seconds": round(seconds, 2),
        "stopped_by_budget": time_ran_out(trainer),
    }


def held_out_metrics(model: nn.Module, loader, class_names: list[str] | None = None) -> dict:
    """Classification metrics of `model` on a held-out split (the test split, once chosen)."""
    scores, labels = predict(model, loader)
    return classification_metrics(scores, labels, class_names)


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    device = next(model.parameters()).device
    scores, labels = [], []
    for x, y in loader:
        scores.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()
