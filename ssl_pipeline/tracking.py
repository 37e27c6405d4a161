"""Where metrics go: `metrics.jsonl` in the run directory always, W&B when the recipe asks,
and a one-line-per-epoch progress report on the terminal."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ssl_pipeline.recipe import WandbConfig


def to_jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON object as one line and flush it, so a crash loses at most that line."""
    with open(path, "a") as f:
        f.write(json.dumps({k: to_jsonable(v) for k, v in record.items()}) + "\n")


class JSONLLogger(Logger):
    """A Lightning logger that appends every logged step to `metrics.jsonl`."""

    def __init__(self, path: Path, stage: str):
        super().__init__()
        self.path = Path(path)
        self.stage = stage

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved recipe.yaml is the record of the settings

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        append_jsonl(self.path, {"stage": self.stage, "step": step, "time": time.time(), **metrics})


def wandb_logger(config: WandbConfig, run_dir: Path, run_name: str, recipe: dict,
                 quiet: bool = False) -> Logger | None:
    """A W&B logger; W&B's own environment variables (WANDB_MODE, ...) override the recipe.

    If W&B cannot start, warn once and go on with local logging only.
    """
    mode = os.environ.get("WANDB_MODE", config.mode)
    if mode == "disabled":
        return None
    if quiet:
        os.environ.setdefault("WANDB_SILENT", "true")
    try:
        logger = WandbLogger(
            project=os.environ.get("WANDB_PROJECT", config.project),
            entity=os.environ.get("WANDB_ENTITY", config.entity),
            group=config.group or run_name,
            tags=config.tags,
            name=config.name or run_name,
            save_dir=str(run_dir),
            mode=mode,
            config=recipe,
        )
        logger.experiment  # starts the run now, so failures surface here  # noqa: B018
        return logger
    except Exception as err:  # W&B failing must never cost the run
        warnings.warn(f"W&B could not start ({err}); continuing with metrics.jsonl only")
        return None


class EpochProgress(pl.Callback):
    """One line per epoch (loss, online monitor, time), readable in CI logs and terminals,
    and the per-epoch history the stage summary and the report use."""

    SHOWN = [("train/loss_epoch", "loss"), ("train/collapse_std", "collapse_std"),
             ("train/accuracy", "train_accuracy")]

    def __init__(self, quiet: bool = False, monitor=None, stream=None):
        self.monitor = monitor  # OnlineKNNMonitor or None; it runs before this callback
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.history: list[dict[str, float]] = []
        self.start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        record = {"epoch": trainer.current_epoch + 1, "seconds": time.time() - self.start}
        record |= {name: metrics[key].item() for key, name in self.SHOWN if key in metrics}
        if self.monitor is not None and record["epoch"] in self.monitor.by_epoch:
            record["knn_top1"] = self.monitor.by_epoch[record["epoch"]]
        self.history.append(record)
        if trainer.is_global_zero and not self.quiet:
            parts = [f"epoch {record['epoch']}/{trainer.max_epochs}"]
            parts += [f"{name} {value:.4f}" for name, value in record.items()
                      if name not in ("epoch", "seconds")]
            parts.append(f"{record['seconds']:.1f} s")
            print("  " + " | ".join(parts), file=self.stream, flush=True)
