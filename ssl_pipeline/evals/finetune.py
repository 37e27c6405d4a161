"""Fine-tuning: the whole network from an initialization, a fresh linear head, a lower
backbone learning rate. The epoch is selected on validation top-1 and reported once on test.

With `frozen`, the same loop is the papers' classic linear probe: the backbone stays frozen in
eval mode (BatchNorm on its running statistics) while only the head trains, on augmented
images (SimSiam's and MoCo's protocol: LARS, 90 epochs, random resized crops and flips).

The best weights are kept as a copy (not a reference: MedMNIST's reference script kept a
reference to its "best" model and so saved the last epoch).

Given a checkpoint path, a run saves its whole state there (weights, optimizer, schedule, the
best epoch's copy, the time budget spent, the random-number generators) at epoch ends, every
epoch or every few minutes, and when it finishes; started again with the same path, it goes on
from there: on the same device it ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn

from ssl_pipeline.atomic import write_atomic
from ssl_pipeline.budget import time_ran_out
from ssl_pipeline.data.base import TransformedDataset
from ssl_pipeline.evals.metrics import classification_metrics, multi_label_metrics
from ssl_pipeline.evals.together import AverageGradients, FitGroup, FitOrder
from ssl_pipeline.features import process_group
from ssl_pipeline.methods.base import OptimSettings, build_optimizer, lr_factor
from ssl_pipeline.resume import (
    ResumableSampler,
    drop_records_after,
    reads_back_whole,
    rng_states,
    set_rng_states,
)

# After DDP pretraining each process fine-tunes in its own single-device Trainer (together.py)
# and rank 0 alone validates; Lightning then suggests syncing the epoch metrics across
# processes, which would wait for the others forever.
warnings.filterwarnings("ignore", message=r".*self\.log\('finetune/.*sync_dist=True.*")


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 10
    optimizer: str = "adamw"
    lr: float = 1e-3
    backbone_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    max_minutes: float | None = None
    frozen: bool = False  # only the head trains; the backbone stays in eval mode
    validations: int | None = None  # validated epochs, evenly spaced (None: every epoch)


def validated_epochs(epochs: int, validations: int | None) -> list[int]:
    """The epochs (1-based) a run of `epochs` validates after: `validations` of them, evenly
    spaced, the last always among them (None, or as many as the epochs: every epoch)."""
    if validations is None or validations >= epochs:
        return list(range(1, epochs + 1))
    return sorted({math.ceil(i * epochs / validations) for i in range(1, validations + 1)})


def seeded_train_loader(dataset: torch.utils.data.Dataset, transform, batch_size: int, seed: int,
                        num_workers: int = 0, shard: bool = False) -> torch.utils.data.DataLoader:
    """Shuffled batches of `transform`ed `(image, label)` items, every epoch's order drawn from
    `(seed, epoch)` and every image's augmentation from `(seed, epoch, index)`: the same batches
    whatever else drew random numbers, how many workers made them, or where a run resumed.

    `shard`: this process's share of every batch of `batch_size` (processes of a process group
    training together, see together.py); the shares of one step make up one process's batch."""
    world = process_group()[1] if shard else 1
    size = len(dataset) // world  # each process's share of the epoch
    batch_size = min(max(1, batch_size // world), size)
    return torch.utils.data.DataLoader(
        TransformedDataset(dataset, transform), batch_size=batch_size,
        sampler=ResumableSampler(len(dataset), seed, shard=world > 1), drop_last=size > batch_size,
        num_workers=num_workers,
        # its own generator: making the iterator does not draw from the global one
        generator=torch.Generator().manual_seed(seed))


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
        # training beside other processes (together.py): log the loss of the whole batch, the
        # mean of every process's share, not this process's share alone
        self.loss_over_processes = False
        # the epochs (1-based) validated; None: every epoch (Lightning's default)
        self.validated = None if settings.validations is None else \
            frozenset(validated_epochs(settings.epochs, settings.validations))
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
        logged = loss.detach()
        if self.loss_over_processes:
            # a copy (detach shares the loss's storage), in a dtype every backend reduces
            logged = logged.to(torch.float32, copy=True)
            dist.all_reduce(logged)
            logged /= dist.get_world_size()
        self.log("finetune/loss", logged, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def on_train_epoch_start(self) -> None:
        if self.validated is not None:
            # Lightning validates after epoch e (1-based) when check_val_every_n_epoch divides
            # e; set before the epoch's first batch, when it is first read (after a resume too)
            epoch = self.trainer.current_epoch + 1
            self.trainer.check_val_every_n_epoch = epoch if epoch in self.validated else epoch + 1

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # after the callbacks' hooks: a time budget that ends training here (Lightning's Timer,
        # or AverageGradients) validates where it stops, as it does when every epoch validates
        if self.validated is not None and self.trainer.should_stop:
            self.trainer.check_val_every_n_epoch = self.trainer.current_epoch + 1

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
    when it trains, the head's alone when the backbone is frozen (it cannot change). The
    history has one entry an epoch, None for an epoch not validated."""

    def __init__(self):
        self.best_score = -1.0
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[float | None] = []

    @staticmethod
    def kept(model: FineTuner) -> nn.Module:
        return model.head if model.settings.frozen else model

    def on_validation_end(self, trainer, pl_module):  # after the module logged val_top1
        score = float(trainer.callback_metrics["finetune/val_top1"])
        self.history += [None] * (trainer.current_epoch - len(self.history))  # epochs not validated
        self.history.append(score)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, trainer.current_epoch + 1
            self.best_state = copy.deepcopy(self.kept(pl_module).state_dict())

    def restore(self, model: FineTuner) -> None:
        """The best epoch's weights back into `model` (nothing kept: left as trained)."""
        if self.best_state is not None:  # None: the time budget ended training before any validation
            self.kept(model).load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_state": self.best_state, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_state, self.history = state["best_state"], list(state["history"])


class EpochCheckpoint(pl.Callback):
    """The run's whole state in `path` (written beside it, then renamed): at the end of the
    first epoch that ends `every_minutes` after the last save (0: every epoch) and when the run
    finishes. It holds the random-number generators' states and the seconds trained so far;
    after a resume it puts the generators back and drops from `metrics` (metrics.jsonl) the
    records `stage` logged after that checkpoint: the resumed run logs those steps again."""

    def __init__(self, path: Path, every_minutes: float = 0.0, metrics: Path | None = None,
                 stage: str | None = None, quiet: bool = True):
        self.path, self.every_seconds = Path(path), 60 * every_minutes
        self.metrics, self.stage, self.quiet = metrics, stage, quiet
        self.seconds_before = 0.0  # trained before this fit call (from the checkpoint)
        self.resumed_epoch = 0
        self._restored: dict[str, Any] | None = None
        self._started = self._saved_at = time.time()
        self._step = self._epochs = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._started = self._saved_at = time.time()
        if self._restored is None:
            return
        set_rng_states(self._restored["rng"])
        # the loops' own state is restored later: the epochs come from ours
        self.resumed_epoch = self._epochs = self._restored["epochs"]
        dropped = 0
        if self.metrics is not None and self.stage is not None:
            dropped = drop_records_after(self.metrics, self.stage, self._restored["step"])
        if not self.quiet:
            print(f"{self.stage or 'fine-tuning'}: resumed after epoch {self._epochs} of "
                  f"{trainer.max_epochs} from {self.path}"
                  + (f"; {dropped} records logged after it dropped from {self.metrics.name}"
                     if dropped else ""), flush=True)
        self._restored = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if time.time() - self._saved_at >= self.every_seconds:
            self.save(trainer, epochs=trainer.current_epoch + 1)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._epochs != trainer.current_epoch or not self.path.exists():
            # finished: a crash later in the run (another grid pair) does not redo this one
            self.save(trainer, epochs=trainer.current_epoch)

    def save(self, trainer: pl.Trainer, epochs: int) -> None:
        """Write the checkpoint, `epochs` epochs trained."""
        self._step, self._epochs = trainer.global_step, epochs
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, trainer.save_checkpoint)
        self._saved_at = time.time()

    @property
    def seconds(self) -> float:
        """Seconds trained, the part before a resume included."""
        return self.seconds_before + time.time() - self._started

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states(), "step": self._step, "epochs": self._epochs,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state
        self.seconds_before = float(state["seconds"])


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
    fit.pop("this_call")
    return {**held_out_metrics(model, test_loader, class_names), **fit}


def fit_finetuner(
    backbone: nn.Module,
    num_classes: int,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    settings: FinetuneSettings,
    trainer_kwargs: dict,
    multi_label: bool = False,
    checkpoint: Path | None = None,
    checkpoint_minutes: float = 0.0,
    metrics: Path | None = None,
    stage: str | None = None,
    quiet: bool = True,
    together: FitGroup | None = None,
    order: FitOrder | None = None,
    resume_from: Path | None = None,
) -> tuple[FineTuner, dict]:
    """Fine-tune `backbone` (modified in place): the model, holding its best validation epoch's
    weights, and how the training went. The test split is not touched.

    With `checkpoint`, the run's state is saved there at the end of an epoch every
    `checkpoint_minutes` (0: every epoch) and when it finishes, and a run started again with
    the same path goes on from it (a finished run's checkpoint returns its model at once); a
    checkpoint that does not read back whole is set aside with a warning. `metrics` and
    `stage` name the metrics.jsonl records a resume replaces; unless `quiet`, a resume says
    so. The fit's `this_call` holds the epochs and seconds of this call alone (`epochs_run`
    and `seconds` count the whole run).

    `together`: every process of the process group trains this fit, each on its share of every
    batch (`train_loader` sharded), gradients averaged (together.py). Rank 0 passes the `order`
    it sends the others (with the checkpoint it resumes from, if any) and validates alone; the
    others pass `val_loader` None and `resume_from`, the checkpoint rank 0 sent them.
    """
    model = FineTuner(backbone, num_classes, settings, multi_label)
    keep = KeepBest()
    max_time = None if settings.max_minutes is None else {"minutes": settings.max_minutes}
    trainer_kwargs = dict(trainer_kwargs)
    callbacks = [keep, *trainer_kwargs.pop("callbacks", [])]
    saver = None
    if checkpoint is not None:
        saver = EpochCheckpoint(checkpoint, checkpoint_minutes, metrics, stage, quiet)
        callbacks.append(saver)
        if checkpoint.exists() and reads_back_whole(checkpoint):
            resume_from = checkpoint
        elif checkpoint.exists():
            warnings.warn(f"{checkpoint} does not read back whole (cut short?); this fine-tuning "
                          "run starts over", stacklevel=2)
    averager = None
    if together is not None:
        if order is not None:  # rank 0: the others train this fit beside it
            together.send(dataclasses.replace(
                order, checkpoint=None if resume_from is None else Path(resume_from).read_bytes()))
        # rank 0's budget, checked in the step every process takes (see AverageGradients)
        budget = None if settings.max_minutes is None or order is None else 60 * settings.max_minutes
        averager = AverageGradients(budget, (lambda: saver.seconds) if saver is not None else None)
        callbacks.append(averager)
        model.loss_over_processes = True
        max_time = None
    trainer = pl.Trainer(max_epochs=settings.epochs, max_time=max_time, callbacks=callbacks,
                         num_sanity_val_steps=0, **trainer_kwargs)
    start = time.time()
    trainer.fit(model, train_loader, val_loader, ckpt_path=resume_from)
    seconds = time.time() - start
    if val_loader is not None:  # without validation (training beside rank 0): the last weights
        keep.restore(model)
    return model, {
        "val_top1": keep.best_score,
        "best_epoch": keep.best_epoch,
        "val_top1_by_epoch": keep.history,
        "epochs_run": trainer.current_epoch,
        "seconds": round(saver.seconds if saver is not None else seconds, 2),  # before a resume too
        "stopped_by_budget": averager.stopped if averager is not None else time_ran_out(trainer),
        "this_call": {"epochs": trainer.current_epoch - (saver.resumed_epoch if saver else 0),
                      "seconds": seconds},
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
