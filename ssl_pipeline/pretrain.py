"""The pretraining stage: backbone + method + data into the Lightning Trainer, then export."""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from ssl_pipeline.backbones import Backbone, create_backbone, export_backbone, load_backbone
from ssl_pipeline.data import TransformedDataset
from ssl_pipeline.data.device_views import DeviceViews, ToUint8Tensor
from ssl_pipeline.data.transforms import (
    ViewSettings,
    crop_and_flips,
    eval_transform,
    ssl_views_transform,
    supervised_train_transform,
)
from ssl_pipeline.budget import time_ran_out
from ssl_pipeline.compute import ChannelsLast
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.methods import OptimSettings, PretrainMethod, methods
from ssl_pipeline.monitor import OnlineKNNMonitor
from ssl_pipeline.names import STAGE_DESCRIPTIONS
from ssl_pipeline.progress import on_terminal
from ssl_pipeline.provenance import provenance
from ssl_pipeline.recipe import Recipe
from ssl_pipeline.resume import ResumableSampler, TrainingCheckpoints, resume_checkpoint
from ssl_pipeline.stages import RunContext, stage_registry
from ssl_pipeline.tracking import EpochProgress, JSONLLogger, stage_metrics

# Lightning's advice to raise num_workers is noise here: data.num_workers is the user's choice.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# The best checkpoint is only considered on epochs where the monitor ran (every N epochs).
warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# Epochs shorter than trainer.log_every_n_steps still log their epoch records (metrics.jsonl).
warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")


def build_backbone(recipe: Recipe, ctx: RunContext) -> Backbone:
    data = ctx.resolved.data
    backbone = create_backbone(
        recipe.backbone.name,
        in_chans=data["channels"],
        input_size=data["image_size"],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        stem=recipe.backbone.stem,
        pretrained=recipe.backbone.pretrained,
        batchnorm=recipe.backbone.batchnorm,
        **recipe.backbone.kwargs,
    )
    if recipe.backbone.weights:
        start = load_backbone(recipe.backbone.weights, name=recipe.backbone.name, stem=backbone.stem,
                              batchnorm=backbone.batchnorm)
        backbone.model.load_state_dict(start.model.state_dict())
    return backbone


def build_method(recipe: Recipe, backbone: Backbone, num_classes: int | None, lr: float) -> PretrainMethod:
    p = recipe.pretrain
    optim = OptimSettings(
        optimizer=p.optimizer, lr=lr, weight_decay=p.weight_decay, momentum=p.momentum,
        betas=p.betas, warmup_epochs=p.warmup_epochs, epochs=p.epochs, scheduler=p.scheduler,
        min_lr_ratio=p.min_lr_ratio,
    )
    method_cls = methods.get(recipe.method.name).obj
    settings = recipe.method_settings.model_dump()
    return method_cls(backbone, optim, num_classes=num_classes, **settings)


def device_views(ctx: RunContext, method: PretrainMethod) -> DeviceViews | None:
    """The views made on the training device, or None when the workers make them."""
    data, views = ctx.resolved.data, ViewSettings(**ctx.resolved.views)
    if views.augment_on != "device":
        return None
    if method.needs_labels:
        views = crop_and_flips(views)  # as supervised_train_transform
    return DeviceViews(views, data["image_size"], data["mean"], data["std"], method.num_views)


def train_transform(ctx: RunContext, method: PretrainMethod):
    """What the workers do to each training image: decode only, or make the views too."""
    data, views = ctx.resolved.data, ViewSettings(**ctx.resolved.views)
    if views.augment_on == "device":
        return ToUint8Tensor(data["image_size"])  # -> uint8 (C, S, S); DeviceViews does the rest
    if method.needs_labels:
        return supervised_train_transform(views, data["image_size"], data["mean"], data["std"])
    return ssl_views_transform(views, data["image_size"], data["mean"], data["std"])


def train_loader(ctx: RunContext, method: PretrainMethod) -> torch.utils.data.DataLoader:
    """Batches of this process's share of each epoch, in an order drawn from the seed and the
    epoch, each image's views from its own seed: resumable mid-epoch (ssl_pipeline.resume)."""
    res = ctx.resolved
    dataset = TransformedDataset(ctx.data.train, train_transform(ctx, method))
    if len(dataset) < res.per_device_batch_size * res.world_size:
        raise SSLPipelineError(
            f"pretrain.batch_size={ctx.recipe.pretrain.batch_size} is larger than the "
            f"{len(dataset)} training images; lower pretrain.batch_size"
        )
    workers = ctx.recipe.data.num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=res.per_device_batch_size,
        sampler=ResumableSampler(len(dataset), ctx.recipe.seed),
        drop_last=True,  # NT-Xent and BatchNorm behave best with equal batches
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: making an epoch's iterator must not draw from the global stream
        # that the device-side views use (a resumed run makes one more iterator).
        generator=torch.Generator().manual_seed(ctx.recipe.seed),
    )


def loader(dataset, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """An evaluation loader: every image once, in order. Its own generator: the first pass of
    persistent workers would otherwise draw a seed from the global stream, at a different
    epoch in a resumed run than in an uninterrupted one."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),
    )


def monitor_callback(ctx: RunContext) -> OnlineKNNMonitor | None:
    p, bundle = ctx.recipe.pretrain, ctx.data
    if p.monitor_every_n_epochs and p.monitor_data is not None:
        bundle = monitor_bundle(ctx)
    if not p.monitor_every_n_epochs or not bundle.labeled or bundle.val is None:
        return None
    if bundle.multi_label and not ctx.quiet:
        print("monitor: multi-label data: the online k-NN scores each label; val k-NN AUC "
              "(mean over labels) selects the best checkpoint", flush=True)
    d = ctx.resolved.data
    transform = eval_transform(d["image_size"], d["mean"], d["std"])
    batch = max(ctx.resolved.per_device_batch_size, 256)
    # the data's split seed: the same draw in every process, on every resume and for every
    # seed of a suite
    seed = (p.monitor_data or ctx.recipe.data).split_seed
    bank_split = bundle.train.stratified(p.monitor_max_bank, seed)
    val_split = bundle.val.stratified(p.monitor_max_queries, seed)
    if not ctx.quiet and (len(bank_split), len(val_split)) != (len(bundle.train), len(bundle.val)):
        print(f"monitor: bank {len(bank_split)} of {len(bundle.train)} train images, queries "
              f"{len(val_split)} of {len(bundle.val)} val images (pretrain.monitor_max_bank / "
              "monitor_max_queries: a seeded draw keeping the class proportions)", flush=True)
    bank = loader(TransformedDataset(bank_split, transform), batch, ctx.recipe.data.num_workers)
    val = loader(TransformedDataset(val_split, transform), batch, ctx.recipe.data.num_workers)
    return OnlineKNNMonitor(bank, val, bundle.num_classes, p.monitor_every_n_epochs,
                            p.monitor_k, p.monitor_temperature,
                            score_head=p.monitor_data is None, multi_label=bundle.multi_label,
                            search=ctx.recipe.eval.knn.search)


def monitor_bundle(ctx: RunContext):
    """`pretrain.monitor_data`, built at the pretraining data's size and channels (once)."""
    if "monitor_bundle" not in ctx.cache:
        from ssl_pipeline.data import build_dataset

        d = ctx.resolved.data
        channels = d["channels"] if d["channels"] in (1, 3) else None
        cfg = ctx.recipe.pretrain.monitor_data.model_copy(
            update={"image_size": d["image_size"], "channels": channels})
        labeled = build_dataset(cfg)
        if not labeled.labeled or labeled.val is None:
            raise SSLPipelineError(
                f"pretrain.monitor_data ({cfg.name}) must be labeled with a val split: the "
                "monitor's k-NN takes its train split as the bank and its val split as queries")
        if labeled.channels != d["channels"]:
            raise SSLPipelineError(
                f"pretrain.monitor_data ({cfg.name}) has {labeled.channels}-channel images, the "
                f"pretraining data {d['channels']}; the backbone takes one kind")
        if not ctx.quiet:
            measure = "k-NN AUC (mean over labels)" if labeled.multi_label else "k-NN top-1"
            print(f"monitor: {measure} on {labeled.name} (pretrain.monitor_data): bank "
                  f"{len(labeled.train)} train images, queries {len(labeled.val)} val images",
                  flush=True)
        ctx.cache["monitor_bundle"] = labeled
    return ctx.cache["monitor_bundle"]




def build_trainer(ctx: RunContext, callbacks: list[pl.Callback], loggers: list) -> pl.Trainer:
    t, p, res = ctx.recipe.trainer, ctx.recipe.pretrain, ctx.resolved
    strategy = t.strategy
    if strategy == "auto" and res.world_size > 1:
        strategy = "ddp"
    plugins = slurm_plugins(t.slurm_requeue)
    return pl.Trainer(
        plugins=plugins or None,
        accelerator=res.accelerator,
        devices=res.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=res.precision,
        max_epochs=p.epochs,
        max_steps=p.max_steps or -1,
        max_time=None if p.max_minutes is None else {"minutes": p.max_minutes},
        accumulate_grad_batches=t.accumulate_grad_batches,
        sync_batchnorm=t.sync_batchnorm,
        deterministic=t.deterministic,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=str(ctx.run_dir),
        enable_progress_bar=not ctx.quiet and on_terminal(sys.stdout),  # bars on terminals only
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # ResumableSampler shards the data over the processes
    )


def slurm_plugins(requeue: bool) -> list:
    """Lightning's SLURM environment with auto-requeue on SIGUSR1 when asked and under srun."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():  # Lightning would requeue by default: only when asked
        return [SLURMEnvironment(auto_requeue=requeue)]
    if requeue:
        warnings.warn("trainer.slurm_requeue is set but this process was not started by SLURM's "
                      "srun; requeueing is off", stacklevel=2)
    return []


@stage_registry.register("pretrain", STAGE_DESCRIPTIONS["pretrain"], distributed=True)
def pretrain_stage(ctx: RunContext) -> dict[str, Any]:
    recipe = ctx.recipe
    pl.seed_everything(recipe.seed, verbose=False)  # identical initial weights on every rank
    backbone = build_backbone(recipe, ctx)
    if ctx.data.multi_label and recipe.method.name == "supervised":
        raise SSLPipelineError(
            f"method supervised trains a single-label classifier, but {ctx.data.name} is "
            "multi-label; pretrain with simclr or simsiam, then fine-tune (the finetune stage "
            "trains one binary classifier per label)")
    method = build_method(recipe, backbone, ctx.data.num_classes, ctx.resolved.effective_lr)
    method.device_views = device_views(ctx, method)
    method.on_nonfinite_loss = recipe.pretrain.on_nonfinite_loss
    if recipe.trainer.compile:
        method.backbone.compile()  # in place: parameter names and exports stay the same
    loader_ = train_loader(ctx, method)

    ckpt_dir = ctx.run_dir / "checkpoints"
    monitor = monitor_callback(ctx)
    # best.ckpt: the epoch with the highest online k-NN top-1 (multi-label: mean per-label
    # AUC), only where the monitor runs.
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor=monitor.key if monitor else None, mode="max",
        save_top_k=1 if monitor else 0, save_last=False, enable_version_counter=False,
    )
    progress = EpochProgress(quiet=ctx.quiet, monitor=monitor)
    saver = TrainingCheckpoints(ckpt_dir, loader_.sampler, recipe.seed,
                                every_n_steps=recipe.pretrain.checkpoint_every_n_steps,
                                per_device_batch=ctx.resolved.per_device_batch_size,
                                metrics=ctx.run_dir / "metrics.jsonl", quiet=ctx.quiet)
    callbacks = [c for c in (monitor, checkpoint, saver, progress) if c]
    if recipe.trainer.channels_last:
        callbacks.append(ChannelsLast())
    loggers = [JSONLLogger(ctx.run_dir / "metrics.jsonl", stage="pretrain")]
    wandb = ctx.tracker.lightning_logger("pretrain")
    if wandb:
        loggers.append(wandb)
    trainer = build_trainer(ctx, callbacks, loggers)

    resume_from = resume_checkpoint(ckpt_dir, ctx.run_dir) if ctx.resuming else None
    start = time.time()
    try:
        trainer.fit(method, loader_, ckpt_path=resume_from)
        seconds = time.time() - start
        if not trainer.is_global_zero:
            return {}
        result = finish_pretrain(ctx, method, trainer, checkpoint, progress, seconds, loader_)
        result["resumed_from_step"] = (saver.resumed_from or {}).get("global_step")
        if wandb:
            experiment = wandb.experiment
            experiment.summary.update(stage_metrics("pretrain", result, {}))
            ctx.tracker.log_backbone(experiment, {"recipe": recipe.name, **result})
        return result
    finally:
        if wandb:  # one W&B run per stage run: a later run in this process must not reuse it
            wandb.experiment.finish()


def finish_pretrain(ctx, method, trainer, checkpoint, progress, seconds, loader_) -> dict[str, Any]:
    exported = "last"
    if ctx.recipe.export == "best" and checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
        method.load_state_dict(state["state_dict"])
        exported = "best"
    metadata = {
        "method": ctx.recipe.method.name,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "exported_checkpoint": exported,
        "recipe": ctx.recipe.name,
        "data": ctx.resolved.data,
        **provenance(),
    }
    export_backbone(method.backbone.cpu(), ctx.run_dir, metadata)
    losses = [h["loss"] for h in progress.history if "loss" in h]
    images = trainer.global_step * ctx.recipe.pretrain.batch_size * ctx.recipe.trainer.accumulate_grad_batches
    return {
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "seconds": round(seconds, 2),
        "images_per_second": round(images / max(seconds, 1e-9), 1),
        "loss_by_epoch": [round(x, 5) for x in losses],
        "loss_first_epoch": losses[0] if losses else None,
        "loss_last_epoch": losses[-1] if losses else None,
        **monitor_results(progress, checkpoint),
        "monitor_data": (ctx.recipe.pretrain.monitor_data.name
                         if ctx.recipe.pretrain.monitor_data else ctx.data.name),
        "curve": epoch_curve(progress.history),
        "exported_checkpoint": exported,
        "backbone": str(Path(ctx.run_dir) / "backbone.safetensors"),
        "max_minutes": ctx.recipe.pretrain.max_minutes,
        "stopped_by_budget": time_ran_out(trainer),
        "skipped_nonfinite_steps": method.skipped_steps,
        "warnings": list(method.warnings),
    }


def epoch_curve(history: list[dict[str, float]]) -> dict[str, list]:
    """The per-epoch history as columns: `epoch`, `seconds` (wall time since the stage started,
    online monitor included), `loss` and, where measured, `knn_top1` (multi-label data:
    `knn_auc`) and `val_accuracy` (None
    on epochs the monitor skipped). An epoch resumed from a checkpoint is not in the history."""
    curve = {"epoch": [int(h["epoch"]) for h in history],
             "seconds": [round(t, 1) for t in itertools.accumulate(h["seconds"] for h in history)]}
    for key in ("loss", "knn_top1", "knn_auc", "val_accuracy"):
        if any(h.get(key) is not None for h in history):
            curve[key] = [None if h.get(key) is None else round(float(h[key]), 5) for h in history]
    return curve


def monitor_results(progress, checkpoint: ModelCheckpoint) -> dict[str, Any]:
    """The online monitor's values by epoch and its best, named by what it measured:
    `monitor_knn_top1_by_epoch` and `best_monitor_knn_top1`, or for multi-label data
    `monitor_knn_auc_*` (mean per-label AUC); `monitor_metric` says which (None: no monitor)."""
    monitor = progress.monitor
    metric = monitor.metric if monitor is not None else None
    name = metric or "knn_top1"  # no monitor: the top-1 keys, empty and None, as before
    return {"monitor_metric": metric,
            # the images each monitor pass searched (pretrain.monitor_max_bank / _queries)
            "monitor_bank_images": len(monitor.bank_loader.dataset) if monitor else None,
            "monitor_query_images": len(monitor.val_loader.dataset) if monitor else None,
            f"monitor_{name}_by_epoch": {str(h["epoch"]): h[name] for h in progress.history
                                         if name in h},
            f"best_monitor_{name}": _best(checkpoint)}


def _best(checkpoint: ModelCheckpoint) -> float | None:
    score = checkpoint.best_model_score
    value = None if score is None else float(np.asarray(score.cpu()))
    return value if value is not None and np.isfinite(value) else None
