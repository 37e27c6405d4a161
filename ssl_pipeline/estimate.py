"""`ssl-pipeline estimate`: how long will the pretraining stage take on this hardware?

It builds the stage exactly as `run` does (data, views, backbone, method, loader, trainer and
precision from the recipe), trains `warmup + steps` optimizer steps (a few dozen, far fewer
than the stage), and times each one: the wait for its batch (data loading) and the step
itself (compute). It also times once what the stage does besides steps: a checkpoint save
and an online-monitor pass (feature extraction of the monitor's bank and validation split
plus the k-NN). The projection is

    startup + steps x seconds per step + saves x seconds per save + monitor passes x seconds per pass

capped by `pretrain.max_minutes`. Nothing is written outside a temporary directory.
"""

from __future__ import annotations

import math
import resource
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ssl_pipeline.errors import SSLPipelineError

DATA_BOUND = 0.15  # the share of a step spent waiting for its batch above which data bounds speed


class StepTimer(pl.Callback):
    """When each training batch started and ended (after the optimizer step)."""

    def __init__(self):
        self.fit_start = 0.0
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the step's kernels, not just their launch
        self.ends.append(time.perf_counter())


def estimate(recipe_path: str, overrides: list[str] = (), steps: int = 20, warmup: int = 3,
             quiet: bool = False) -> dict[str, Any]:
    """Time `warmup + steps` training steps of the recipe and project its pretraining stage."""
    from ssl_pipeline.compute import ChannelsLast
    from ssl_pipeline.data.transforms import fit_views
    from ssl_pipeline.pipeline import _quiet_lightning, data_facts, resolve
    from ssl_pipeline.pretrain import (
        build_backbone,
        build_method,
        build_trainer,
        device_views,
        monitor_callback,
        train_loader,
    )
    from ssl_pipeline.recipe import load_recipe
    from ssl_pipeline.stages import RunContext

    if steps < 1 or warmup < 0:
        raise SSLPipelineError("estimate needs --steps of at least 1 and --warmup of at least 0")
    recipe = load_recipe(recipe_path, list(overrides))
    if "pretrain" not in recipe.stages:
        raise SSLPipelineError(f"{recipe_path} has no pretrain stage to estimate")
    measured_steps = warmup + steps
    short = recipe.model_copy(update={"pretrain": recipe.pretrain.model_copy(
        update={"max_steps": measured_steps, "max_minutes": None})})
    _quiet_lightning()
    resolved = resolve(short)
    with tempfile.TemporaryDirectory(prefix="ssl_pipeline_estimate_") as tmp:
        ctx = RunContext(short, Path(tmp), resolved, quiet=True)
        resolved.data = data_facts(ctx)
        views = fit_views(resolved.data["image_size"], resolved.data["channels"],
                          short.views.model_dump())
        resolved.views = asdict(views)
        if not quiet:
            print(f"estimate: timing {measured_steps} training steps of {recipe_path} "
                  f"({warmup} to warm up, then {steps})", flush=True)
        pl.seed_everything(short.seed, verbose=False)
        backbone = build_backbone(short, ctx)
        method = build_method(short, backbone, ctx.data.num_classes, resolved.effective_lr)
        method.device_views = device_views(ctx, method)
        if short.trainer.compile:
            method.backbone.compile()
        loader_ = train_loader(ctx, method)
        timer = StepTimer()
        callbacks = [timer] + ([ChannelsLast()] if short.trainer.channels_last else [])
        trainer = build_trainer(ctx, callbacks, loggers=[])
        trainer.fit(method, loader_)
        if len(timer.ends) < measured_steps:
            raise SSLPipelineError(
                f"only {len(timer.ends)} steps ran ({len(loader_)} batches per epoch); "
                "lower --steps, or give the recipe more data"
            )
        save_seconds = _time(lambda: trainer.save_checkpoint(Path(tmp) / "timing.ckpt"))
        monitor = monitor_callback(ctx)
        monitor_seconds = _time(lambda: _monitor_pass(monitor, method)) if monitor else 0.0
    return _project(recipe, resolved, timer, warmup, len(loader_), save_seconds, monitor_seconds,
                    trainer.world_size)


def _time(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _monitor_pass(monitor, method) -> None:
    from ssl_pipeline.features import extract_features

    bank, bank_labels = extract_features(method.backbone, monitor.bank_loader, method.device)
    val, val_labels = extract_features(method.backbone, monitor.val_loader, method.device)
    monitor.score(bank, bank_labels, val, val_labels)


def _project(recipe, resolved, timer: StepTimer, warmup: int, batches_per_epoch: int,
             save_seconds: float, monitor_seconds: float, world: int) -> dict[str, Any]:
    p, t = recipe.pretrain, recipe.trainer
    starts, ends = timer.starts, timer.ends
    n = len(ends) - warmup
    step = (ends[-1] - ends[warmup - 1] if warmup else ends[-1] - starts[0]) / n
    waits = [starts[i] - ends[i - 1] for i in range(max(warmup, 1), len(ends))]
    wait = sum(waits) / len(waits) if waits else 0.0
    startup = starts[0] - timer.fit_start
    steps_per_epoch = batches_per_epoch // t.accumulate_grad_batches
    total_steps = p.epochs * steps_per_epoch
    epochs = p.epochs
    if p.max_steps:
        total_steps = min(total_steps, p.max_steps)
        epochs = math.ceil(total_steps / steps_per_epoch)
    monitors = 0
    if p.monitor_every_n_epochs and monitor_seconds:
        monitors = len({e for e in range(1, epochs + 1)
                        if e % p.monitor_every_n_epochs == 0 or e == epochs})
    saves = epochs + (total_steps // p.checkpoint_every_n_steps if p.checkpoint_every_n_steps else 0)
    saves += monitors  # the best checkpoint, at most once per monitor pass
    seconds = startup + total_steps * step + saves * save_seconds + monitors * monitor_seconds
    budget = p.max_minutes * 60 if p.max_minutes else None
    capped = budget is not None and seconds > budget
    images_per_step = resolved.per_device_batch_size * world * t.accumulate_grad_batches
    bound = "data loading" if wait > DATA_BOUND * step else "compute"
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "measured_steps": n,
        "warmup_steps": warmup,
        "seconds_per_step": round(step, 4),
        "data_wait_per_step": round(wait, 4),
        "compute_per_step": round(step - wait, 4),
        "images_per_second": round(images_per_step / step, 1),
        "bound_by": bound,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "startup_seconds": round(startup, 2),
        "checkpoint_save_seconds": round(save_seconds, 3),
        "checkpoint_saves": saves,
        "monitor_pass_seconds": round(monitor_seconds, 2),
        "monitor_passes": monitors,
        "seconds_per_epoch": round(steps_per_epoch * step + save_seconds
                                   + (monitor_seconds * monitors / epochs if epochs else 0), 1),
        "projected_seconds": round(min(seconds, budget) if capped else seconds, 1),
        "stopped_by_budget": capped,
        "peak_memory_mb": round(rss_mb, 1),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available() else None,
        "device": resolved.accelerator,
        "precision": resolved.precision,
        "world_size": world,
    }


def describe(e: dict[str, Any]) -> str:
    """The estimate as the lines `ssl-pipeline estimate` prints."""
    lines = [
        f"measured: {e['measured_steps']} steps after {e['warmup_steps']} warm-up steps on "
        f"{e['world_size']} {e['device']} process(es), precision {e['precision']}",
        f"  {e['images_per_second']} images/s; {e['seconds_per_step']:.3f} s per step, of which "
        f"{e['data_wait_per_step']:.3f} s waiting for data and {e['compute_per_step']:.3f} s computing",
        (f"  bound by: {e['bound_by']}"
         + ("  (raise data.num_workers, or views.augment_on: device)"
            if e["bound_by"] == "data loading" else "")),
        (f"  peak memory: {e['peak_memory_mb']:.0f} MB in the training process (data workers "
         "not counted)"
         + (f", {e['peak_gpu_memory_mb']:.0f} MB on the GPU" if e["peak_gpu_memory_mb"] else "")),
        (f"projected: {_duration(e['seconds_per_epoch'])} per epoch ({e['steps_per_epoch']} steps); "
         f"pretraining stage {_duration(e['projected_seconds'])} ({e['total_steps']} steps, "
         f"{e['checkpoint_saves']} checkpoint saves of {e['checkpoint_save_seconds']:.2f} s, "
         f"{e['monitor_passes']} monitor passes of {e['monitor_pass_seconds']:.1f} s, startup "
         f"{e['startup_seconds']:.1f} s)"
         + (" - capped by pretrain.max_minutes" if e["stopped_by_budget"] else "")),
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

