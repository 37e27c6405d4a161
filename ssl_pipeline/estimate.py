"""`ssl-pipeline estimate`: how long will the recipe's stages take on this hardware?

It builds the stage exactly as `run` does (data, views, backbone, method, loader, trainer and
precision from the recipe), trains `warmup + steps` optimizer steps (a few dozen, far fewer
than the stage), and times each one: the wait for its batch (data loading) and the step
itself (compute). It also times once what the stage does besides steps: a checkpoint save
and an online-monitor pass (feature extraction of the monitor's bank and validation split
plus the k-NN). The projection is

    startup + steps x seconds per step + saves x seconds per save + monitor passes x seconds per pass

capped by `pretrain.max_minutes`. The evaluation stages are projected from timings of the
same kind, on the pretraining architecture: feature extraction (images per second, times the
splits and backbones that k-NN, the probes and few-shot extract once), k-NN and the linear
probe on random features of the real dimensions (a sample of the real sizes, scaled), and for fine-tuning and
the classic probe a few training steps, one validation pass, one test pass and one checkpoint
save, times the runs (backbones x label fractions x seeds x grid pairs), their epochs and
`max_minutes` budgets. Nothing is written outside a temporary directory.
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
from ssl_pipeline.recipe import Recipe

DATA_BOUND = 0.15  # the share of a step spent waiting for its batch above which data bounds speed


class StepTimer(pl.Callback):
    """When each training batch started and ended (after the optimizer step)."""

    def __init__(self):
        self.fit_start = self.fit_end = 0.0
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the step's kernels, not just their launch
        self.ends.append(time.perf_counter())


def estimate(recipe_or_path: str | Recipe, overrides: list[str] = (), steps: int = 20, warmup: int = 3,
             quiet: bool = False, source: str | None = None) -> dict[str, Any]:
    """Time `warmup + steps` training steps of the recipe (a file, or a loaded `Recipe`
    named `source` in messages) and project its pretraining stage, then its evaluation
    stages. Without a pretrain stage, the evaluation stages alone, on `eval.backbone`."""
    from ssl_pipeline.evaluation import evaluated_backbone
    from ssl_pipeline.features import process_group
    from ssl_pipeline.pipeline import (
        _quiet_lightning,
        data_facts,
        join_launched_processes,
        resolve,
    )
    from ssl_pipeline.recipe import load_recipe
    from ssl_pipeline.stages import RunContext, is_global_zero

    if steps < 1 or warmup < 0:
        raise SSLPipelineError("estimate needs --steps of at least 1 and --warmup of at least 0")
    if isinstance(recipe_or_path, Recipe):
        recipe, source = recipe_or_path, source or "the recipe"
    else:
        recipe, source = load_recipe(recipe_or_path, list(overrides)), source or str(recipe_or_path)
    pretrain = "pretrain" in recipe.stages
    if not pretrain and recipe.eval.backbone is None:
        raise SSLPipelineError(
            f"{source} has no pretrain stage and no eval.backbone: nothing to estimate "
            "(give the backbone to evaluate with --set eval.backbone=PATH)")
    # enough epochs for the timed steps when an epoch has fewer batches (a small dataset)
    short = recipe.model_copy(update={"pretrain": recipe.pretrain.model_copy(update={
        "max_steps": warmup + steps, "max_minutes": None,
        "epochs": max(recipe.pretrain.epochs, warmup + steps)})})
    _quiet_lightning()
    resolved = resolve(short)
    with tempfile.TemporaryDirectory(prefix="ssl_pipeline_estimate_") as tmp:
        ctx = RunContext(short, Path(tmp), resolved, quiet=True)
        resolved.data = data_facts(ctx)
        if pretrain:
            figures, backbone = _pretraining(ctx, recipe, source, steps, warmup, quiet)
        else:
            # processes torchrun started evaluate together, as `ssl-pipeline evaluate` would
            join_launched_processes(ctx)
            backbone = evaluated_backbone(ctx)
            figures = {"projected_seconds": 0.0, "device": resolved.accelerator,
                       "precision": resolved.precision, "world_size": process_group()[1]}
        # as in a run, rank 0 alone evaluates (timings taken beside other processes would
        # mislead); it projects the shares of the work that all processes do together
        evaluation = _evaluation(ctx, backbone, steps, warmup, quiet) if is_global_zero() else {}
        if ctx.cache.pop("own_process_group", False):
            torch.distributed.destroy_process_group()
    if evaluation:
        figures["evaluation"] = evaluation
        figures["projected_total_seconds"] = round(
            figures["projected_seconds"] + evaluation["projected_seconds"], 1)
    return figures


def estimate_suite(path: str, overrides: list[str] = (), steps: int = 20, warmup: int = 3,
                   quiet: bool = False) -> dict[str, Any]:
    """`estimate` of every variant of a suite, in the order `run` takes them, and the sum. A
    baseline an earlier variant evaluates (same backbone, data, evaluation settings, seed,
    precision and cache, with `eval.reuse_baselines`) is reused, as in a run: the variant's
    estimate leaves it out."""
    from ssl_pipeline.suite import load_suite, variant_recipes

    variants: dict[str, Any] = {}
    evaluated: dict[str, set[str]] = {}  # baselines evaluated so far, by what their results depend on
    for name, recipe in variant_recipes(load_suite(path, overrides), str(path)).items():
        done = evaluated.setdefault(_baselines_signature(recipe), set())
        own = list(recipe.eval.baselines)
        reused = [b for b in own if b in done] if recipe.eval.reuse_baselines else []
        done.update(own)
        if reused:
            recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(
                update={"baselines": [b for b in own if b not in reused]})})
        if not quiet:
            print(f"estimate: variant {name}", flush=True)
        try:
            figures = estimate(recipe, steps=steps, warmup=warmup, quiet=quiet,
                               source=f"{path} (variant {name})")
        except SSLPipelineError as error:  # the others are still estimated, as run runs them
            variants[name] = {"error": str(error)}
            continue
        variants[name] = {**figures, "baselines_reused": reused}
    total = sum(v.get("projected_total_seconds", v["projected_seconds"])
                for v in variants.values() if "error" not in v)
    return {"suite": str(path), "variants": variants, "projected_total_seconds": round(total, 1),
            "failed": [name for name, v in variants.items() if "error" in v]}


def _baselines_signature(recipe: Recipe) -> str:
    """What a variant's baseline results depend on (evaluation.result_key), and where a run
    keeps them for the next variant to reuse (eval.cache_dir)."""
    import json

    from ssl_pipeline.evaluation import EVAL_KEYS_NOT_IN_RESULTS

    parts = [recipe.backbone.model_dump(mode="json"), recipe.data.model_dump(mode="json"),
             recipe.eval.model_dump(mode="json", exclude=set(EVAL_KEYS_NOT_IN_RESULTS)),
             str(recipe.eval.cache_dir), recipe.seed, recipe.trainer.precision]
    return json.dumps(parts, sort_keys=True, default=str)


def _pretraining(ctx, recipe, recipe_path: str, steps: int, warmup: int, quiet: bool):
    """The pretraining stage's projection and the backbone it trained a few steps."""
    from ssl_pipeline.compute import ChannelsLast
    from ssl_pipeline.data.transforms import fit_views
    from ssl_pipeline.pretrain import (
        build_backbone,
        build_method,
        build_trainer,
        device_views,
        monitor_callback,
        train_loader,
    )

    short, resolved, tmp = ctx.recipe, ctx.resolved, ctx.run_dir
    measured_steps = warmup + steps
    views = fit_views(resolved.data["image_size"], resolved.data["channels"], short.views.model_dump())
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
    figures = _project(recipe, resolved, timer, warmup, len(loader_), save_seconds,
                       monitor_seconds, trainer.world_size)
    return figures, method.backbone


FEATURE_STAGES = ("knn", "linear_probe", "few_shot")


def _evaluation(ctx, backbone, steps: int, warmup: int, quiet: bool) -> dict[str, Any]:
    """Projected seconds of the recipe's evaluation stages, from timings on `backbone` (the
    pretraining architecture; its speed does not depend on its weights)."""
    from ssl_pipeline.evaluation import Subject

    recipe = ctx.recipe
    backbones = 1 + ("random_init" in recipe.eval.baselines)  # the same architecture, same speed
    subject = Subject("backbone", backbone)
    out: dict[str, Any] = {}
    if any(stage in recipe.stages for stage in FEATURE_STAGES):
        if not quiet:
            print("estimate: timing feature extraction", flush=True)
        out["features"] = _feature_projection(ctx, subject, steps, backbones)
    for stage in ("knn", "linear_probe"):
        if stage in recipe.stages:
            if not quiet:
                print(f"estimate: timing {stage} on features of the data's sizes", flush=True)
            out[stage] = _cached_feature_projection(ctx, stage, backbone.feature_dim, backbones)
    for stage, classic in (("finetune", False), ("linear_probe_classic", True)):
        if stage in recipe.stages:
            if not quiet:
                print(f"estimate: timing {stage} steps", flush=True)
            out[stage] = _finetune_projection(ctx, subject, classic, steps, warmup, backbones)
    if out:
        out["projected_seconds"] = round(sum(part["projected_seconds"] for part in out.values()), 1)
    return out


def _feature_projection(ctx, subject, steps: int, backbones: int) -> dict[str, Any]:
    from ssl_pipeline.compute import channels_last
    from ssl_pipeline.data import TransformedDataset
    from ssl_pipeline.evaluation import eval_device, transform_for
    from ssl_pipeline.features import extract_features, process_group

    bundle, batch = ctx.data, ctx.recipe.eval.batch_size
    images = min(len(bundle.train), batch * (steps + 1))
    sample = torch.utils.data.Subset(bundle.train, range(images))
    loader = torch.utils.data.DataLoader(TransformedDataset(sample, transform_for(subject, ctx)),
                                         batch_size=batch, num_workers=ctx.recipe.data.num_workers)
    device = eval_device(ctx)
    model = subject.backbone.to(device)
    if ctx.recipe.trainer.channels_last:
        channels_last(model)
    extract_features(model, [next(iter(loader))], device)  # warm-up: kernels, thread pools
    seconds = _time(lambda: extract_features(model, loader, device))
    rate = images / seconds
    total = sum(len(getattr(bundle, split)) for split in ("train", "val", "test"))
    # the processes of a process group extract labeled splits together, a shard each
    # (evaluation.share_features): rank 0 timed its own rate, each takes 1/processes
    processes = process_group()[1] if bundle.labeled else 1
    return {"images_per_second": round(rate, 1), "images": total * backbones,
            "backbones": backbones, "processes": processes,
            "projected_seconds": round(total * backbones / (rate * processes), 1),
            "note": "at most: features already in eval.cache_dir are read, not extracted"}


def _cached_feature_projection(ctx, stage: str, feature_dim: int, backbones: int) -> dict[str, Any]:
    """k-NN or the linear probe on random features of the real dimensions, timed on a sample
    of the real sizes and scaled: brute-force k-NN by bank rows x queries, the probe by
    training rows x epochs (its settings train together, then its seeds)."""
    from ssl_pipeline.evaluation import eval_device, raw_pixel_dims

    recipe, bundle = ctx.recipe, ctx.data
    dims = [feature_dim] * backbones
    if (pixels := raw_pixel_dims(ctx)) is not None:
        dims.append(pixels)
    sizes = {split: len(getattr(bundle, split)) for split in ("train", "val", "test")}
    if stage == "knn":  # faiss picks its own device
        timed = {d: _knn_seconds(recipe, sizes, d, bundle.num_classes) for d in sorted(set(dims))}
    else:
        timed = {d: _probe_seconds(recipe, sizes, d, bundle.num_classes, eval_device(ctx))
                 for d in sorted(set(dims))}
    return {"subjects": len(dims), "dimensions": sorted(timed),
            "projected_seconds": round(sum(timed[d] for d in dims), 1)}


def _random_features(n: int, d: int, classes: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng([seed, n, d])
    return rng.standard_normal((n, d), dtype=np.float32), rng.integers(0, classes, n)


def _knn_seconds(recipe, sizes: dict[str, int], d: int, classes: int) -> float:
    from ssl_pipeline.evals.knn import knn_classify

    ks = tuple(k for k, _ in recipe.eval.knn.settings)
    bank, queries = min(sizes["train"], 20_000), min(sizes["test"], 2_000)
    (x, y), (q, _) = _random_features(bank, d, classes), _random_features(queries, d, classes, 1)
    search = recipe.eval.knn.search
    knn_classify(x, y, q[:10], classes, ks=(1,), search=search)  # warm-up (a first bf16 compiles)
    seconds = _time(lambda: knn_classify(x, y, q, classes, ks=ks, temperature=0.1, search=search))
    return seconds * (sizes["train"] * sizes["test"]) / (bank * queries)


def _probe_seconds(recipe, sizes: dict[str, int], d: int, classes: int, device: str = "cpu") -> float:
    from ssl_pipeline.evals.linear_probe import linear_probe

    cfg = recipe.eval.linear_probe
    rows = min(sizes["train"], 50 * cfg.batch_size)
    splits = [_random_features(min(sizes[split], rows), d, classes, i)
              for i, split in enumerate(("train", "val", "test"))]
    grid = {"lr": tuple(cfg.lr_grid), "weight_decay": tuple(cfg.weight_decay_grid)}

    def probe(epochs: int) -> float:
        return _time(lambda: linear_probe(*splits[0], *splits[1], *splits[2], classes, grid=grid,
                                          seeds=recipe.eval.seeds, epochs=epochs,
                                          batch_size=cfg.batch_size, device=device))

    probe(1)  # warm-up
    one, three = probe(1), probe(3)  # the epochs' cost apart from the fixed part
    per_epoch = max(three - one, 0.0) / 2
    seconds = (max(one - per_epoch, 0.0) + per_epoch * cfg.epochs) * sizes["train"] / rows
    return seconds if cfg.max_minutes is None else min(seconds, 60 * cfg.max_minutes)


def _finetune_projection(ctx, subject, classic: bool, steps: int, warmup: int,
                         backbones: int) -> dict[str, Any]:
    """Time `warmup + steps` steps of one run (its first grid pair), one validation and one
    test pass and one checkpoint save; project every run of the stage."""
    import copy
    import dataclasses

    from ssl_pipeline.evals.finetune import fit_finetuner, predict, validated_epochs
    from ssl_pipeline.evaluation import (
        finetune_plan,
        finetune_trainer_kwargs,
        trains_together,
    )
    from ssl_pipeline.features import process_group

    recipe, bundle = ctx.recipe, ctx.data
    # when every process trains each run after DDP pretraining, a share of each batch: rank 0
    # times steps of its share (the gradients' all-reduce is not timed)
    processes = process_group()[1] if trains_together(ctx) else 1
    plan = finetune_plan(ctx, subject, 1.0, 0, classic, shard=processes > 1)
    settings = dataclasses.replace(plan.grid[0], epochs=10**6, max_minutes=None)
    timer = StepTimer()
    kwargs = finetune_trainer_kwargs(ctx, "estimate")
    kwargs.update(logger=False, enable_progress_bar=False, max_steps=warmup + steps,
                  limit_val_batches=0, callbacks=[timer, *kwargs.get("callbacks", [])])
    torch.manual_seed(recipe.seed)
    with tempfile.TemporaryDirectory(prefix="ssl_pipeline_estimate_ft_") as tmp:
        model, _ = fit_finetuner(copy.deepcopy(subject.backbone).train(), bundle.num_classes,
                                 *plan.loaders[:2], settings, kwargs, bundle.multi_label,
                                 checkpoint=Path(tmp) / "timing.ckpt", checkpoint_minutes=1e9)
        save_seconds = time.perf_counter() - timer.fit_end  # the one save, when the fit ends
    val_seconds = _time(lambda: predict(model, plan.loaders[1]))
    test_seconds = _time(lambda: predict(model, plan.loaders[2]))
    n = len(timer.ends) - warmup
    step = (timer.ends[-1] - timer.ends[warmup - 1] if warmup else timer.ends[-1] - timer.starts[0]) / n
    minutes = recipe.eval.checkpoint_minutes
    if classic:
        probe = recipe.eval.linear_probe_classic
        fractions = [(1.0, len(bundle.train), probe.seeds, probe.epochs)]
        budget, validations = probe.max_minutes, None
    else:
        cfg = recipe.eval.finetune
        fractions = [(f, len(finetune_plan(ctx, subject, f, 0).train),
                      recipe.eval.seeds if f < 1.0 else cfg.full_data_seeds, cfg.epochs_for(f))
                     for f in cfg.label_fractions]
        budget, validations = cfg.max_minutes, cfg.validations
    pairs = len(plan.grid)
    total, count, by_fraction = 0.0, 0, []
    for fraction, images, seeds, epochs in fractions:
        steps_per_epoch = max(images // min(plan.batch, images), 1)
        passes = len(validated_epochs(epochs, validations))
        epoch_seconds = steps_per_epoch * step + val_seconds * passes / epochs  # on average
        epochs_run = epochs
        if budget is not None and epochs * epoch_seconds > 60 * budget:
            epochs_run = min(epochs, math.ceil(60 * budget / epoch_seconds))  # Lightning's max_time
        train = min(epochs * epoch_seconds, 60 * budget) if budget is not None else epochs * epoch_seconds
        saves = 0 if minutes is None else (epochs_run if minutes == 0 else 1 + int(train // (60 * minutes)))
        run_seconds = pairs * (train + saves * save_seconds) + test_seconds
        total += backbones * seeds * run_seconds
        count += backbones * seeds * pairs
        by_fraction.append({"fraction": fraction, "images": images, "steps_per_epoch": steps_per_epoch,
                            "seeds": seeds, "epochs": epochs, "epochs_run": epochs_run,
                            "validation_passes": passes,
                            "checkpoint_saves": saves,
                            "seconds_per_run": round(run_seconds, 2)})
    return {"seconds_per_step": round(step, 4), "images_per_second": round(plan.batch / step, 1),
            "validation_pass_seconds": round(val_seconds, 3), "test_pass_seconds": round(test_seconds, 3),
            "checkpoint_save_seconds": round(save_seconds, 3), "runs": count,
            # one number, or one per label fraction (eval.finetune.epochs as a mapping)
            "epochs": epochs if len({f[3] for f in fractions}) == 1 else [f[3] for f in fractions],
            "grid_pairs": pairs, "backbones": backbones, "processes": processes, "by_fraction": by_fraction,
            "projected_seconds": round(total, 1)}


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
    lines = _pretraining_lines(e) if "measured_steps" in e else [
        (f"no pretrain stage: the evaluation stages on eval.backbone ({e['world_size']} "
         f"{e['device']} process(es), precision {e['precision']})")]
    return "\n".join(lines + _evaluation_lines(e))


def describe_suite(e: dict[str, Any]) -> str:
    """A suite's estimate: each variant's lines, indented, then the sum."""
    lines, parts = [], []
    for name, figures in e["variants"].items():
        if "error" in figures:
            lines.append(f"variant {name}: cannot be estimated: {figures['error']}")
            parts.append(f"{name} not estimated")
            continue
        reused = figures["baselines_reused"]
        reused = f" (reusing an earlier variant's {', '.join(reused)})" if reused else ""
        lines.append(f"variant {name}{reused}:")
        lines += ["  " + line for line in describe(figures).splitlines()]
        parts.append(f"{name} {_duration(figures.get('projected_total_seconds', figures['projected_seconds']))}")
    lines.append(f"suite projected total: {_duration(e['projected_total_seconds'])} ({', '.join(parts)})")
    return "\n".join(lines)


def _pretraining_lines(e: dict[str, Any]) -> list[str]:
    return [
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


def _evaluation_lines(e: dict[str, Any]) -> list[str]:
    ev = e.get("evaluation")
    if not ev:
        return []
    parts = []
    if "features" in ev:
        f = ev["features"]
        together = f", {f['processes']} processes a shard each" if f.get("processes", 1) > 1 else ""
        parts.append(f"features {_duration(f['projected_seconds'])} (at most: {f['images']} "
                     f"images at {f['images_per_second']:.0f}/s{together})")
    for stage in ("knn", "linear_probe"):
        if stage in ev:
            n = ev[stage]["subjects"] - 1  # the backbone's baselines
            parts.append(f"{stage} {_duration(ev[stage]['projected_seconds'])} (the backbone"
                         + (f" and {n} baseline{'s' * (n > 1)})" if n else ")"))
    for stage in ("finetune", "linear_probe_classic"):
        if stage in ev:
            f = ev[stage]
            epochs = "/".join(map(str, f["epochs"])) if isinstance(f["epochs"], list) else f["epochs"]
            parts.append(f"{stage} {_duration(f['projected_seconds'])} ({f['runs']} runs of "
                         f"{epochs} epochs at {f['images_per_second']:.0f} images/s, "
                         f"validation {f['validation_pass_seconds']:.1f} s a pass, "
                         f"{_passes(f)})")
    return [f"projected evaluation: {_duration(ev['projected_seconds'])}: " + "; ".join(parts),
            f"projected total: {_duration(e['projected_total_seconds'])}"]


def _passes(projection: dict[str, Any]) -> str:
    """`every epoch`, or each label fraction's validation passes: `10/10/3 passes a run`."""
    by_fraction = projection["by_fraction"]
    if all(f["validation_passes"] == f["epochs"] for f in by_fraction):
        return "every epoch"
    return "/".join(str(f["validation_passes"]) for f in by_fraction) + " passes a run"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

