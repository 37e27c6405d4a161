"""The evaluation stages: k-NN, linear probe, few-shot (on cached features) and fine-tuning.

Each stage evaluates the run's backbone and, through exactly the same code, the reference rows
the recipe asks for (`eval.baselines`): the same architecture at random initialization, and raw
pixels where images are small. A supervised-pretrained backbone is evaluated like an SSL one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ssl_pipeline
from ssl_pipeline.atomic import write_text_atomic
from ssl_pipeline.backbones import Backbone, create_backbone, fit_input_channels, load_backbone
from ssl_pipeline.compute import ChannelsLast, channels_last
from ssl_pipeline.data import TransformedDataset
from ssl_pipeline.data.transforms import eval_transform, fit_views, supervised_train_transform
from ssl_pipeline.embedding_map import FILE as EMBEDDING_MAP, write_embedding_map
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.evals.few_shot import few_shot, vtab_1k
from ssl_pipeline.evals.finetune import (FinetuneSettings, fit_finetuner, held_out_metrics,
                                         seeded_train_loader, validated_epochs)
from ssl_pipeline.evals.knn import knn_classify
from ssl_pipeline.evals.linear_probe import linear_probe
from ssl_pipeline.evals.metrics import classification_metrics
from ssl_pipeline.evals.subsets import balanced_subset, listed_subset
from ssl_pipeline.evals.together import FitGroup, FitOrder, fit_devices
from ssl_pipeline.features import (
    cache_key, cached_features, process_group, weights_hash,
)
from ssl_pipeline.names import STAGE_DESCRIPTIONS
from ssl_pipeline.progress import on_terminal
from ssl_pipeline.provenance import code_fingerprint
from ssl_pipeline.stages import RunContext, stage_registry
from ssl_pipeline.tracking import JSONLLogger

SPLITS = ("train", "val", "test")


@dataclass
class Subject:
    """What is evaluated: the run's backbone, a baseline backbone, or raw pixels (None)."""

    name: str
    backbone: Backbone | None


# ------------------------------------------------------------------ what is evaluated


def evaluated_backbone(ctx: RunContext) -> Backbone:
    """The run's exported backbone, else `eval.backbone`; loaded once per run."""
    if "backbone" not in ctx.cache:
        exported = ctx.run_dir / "backbone.safetensors"
        path = exported if exported.exists() else ctx.recipe.eval.backbone
        if path is None:
            raise SSLPipelineError(
                "nothing to evaluate: list 'pretrain' before the evaluation stages, or give a "
                "backbone (eval.backbone in the recipe, or ssl-pipeline evaluate --backbone PATH)"
            )
        backbone = load_backbone(path, name=ctx.recipe.backbone.name)
        if backbone.preprocessing.in_chans != ctx.data.channels:
            source = backbone.preprocessing.in_chans
            rule = fit_input_channels(backbone, ctx.data.channels, ctx.data.mean, ctx.data.std)
            ctx.cache["input_channels"] = {"backbone": source, "data": ctx.data.channels,
                                           "rule": rule}
            if not ctx.quiet:
                print(f"evaluate: the backbone takes {source}-channel images, {ctx.data.name} "
                      f"has {ctx.data.channels}: first convolution adapted ({rule})", flush=True)
        ctx.cache["backbone"] = backbone
    return ctx.cache["backbone"]


def subjects(ctx: RunContext) -> list[Subject]:
    backbone = evaluated_backbone(ctx)
    found = [Subject("backbone", backbone)]
    if "random_init" in ctx.recipe.eval.baselines:
        found.append(Subject("random_init", random_init_like(backbone, ctx.recipe.seed, ctx)))
    if raw_pixel_dims(ctx) is not None:
        found.append(Subject("raw_pixels", None))
    return found


def raw_pixel_dims(ctx: RunContext) -> int | None:
    """The raw-pixel baseline's dimensions, None when it is not evaluated (not asked for, or
    more than `eval.raw_pixels_max_dims`)."""
    dims = ctx.data.channels * ctx.data.image_size ** 2
    wanted = "raw_pixels" in ctx.recipe.eval.baselines and dims <= ctx.recipe.eval.raw_pixels_max_dims
    return dims if wanted else None


def random_init_like(backbone: Backbone, seed: int, ctx: RunContext) -> Backbone:
    """The same architecture, stem and preprocessing, freshly initialized (seeded).

    Norm layers whose scale starts at zero (timm zero-initializes the last BatchNorm of each
    residual block, a training trick) are reset to one: otherwise every residual branch is
    dead at initialization and the baseline sees only the shortcut path, which would make it
    artificially weak and every pretrained backbone look better than it is.
    """
    if "random_init" not in ctx.cache:
        torch.manual_seed(seed)
        p = backbone.preprocessing
        fresh = create_backbone(
            backbone.name, in_chans=p.in_chans, input_size=p.input_size, mean=p.mean, std=p.std,
            stem=backbone.stem, batchnorm=backbone.batchnorm, **backbone.model_kwargs,
        ).eval()
        ctx.cache["random_init"] = revive_zero_init_norms(fresh)
    return ctx.cache["random_init"]


def revive_zero_init_norms(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (changed in place) with every norm layer whose scale is all zeros set to one:
    what a random-init baseline needs (see `random_init_like`)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and weight is not None \
                and not weight.detach().any():
            torch.nn.init.ones_(weight)
    return model


# ------------------------------------------------------------------ features


def transform_for(subject: Subject, ctx: RunContext):
    """The eval transform at the backbone's own resolution and normalization."""
    if subject.backbone is None:
        d = ctx.resolved.data
        return eval_transform(d["image_size"], d["mean"], d["std"])
    p = subject.backbone.preprocessing
    if p.in_chans != ctx.data.channels:  # (evaluated_backbone adapts the run's backbone)
        raise SSLPipelineError(
            f"the backbone takes {p.in_chans}-channel images but {ctx.data.name} has "
            f"{ctx.data.channels}"
        )
    return eval_transform(p.input_size, p.mean, p.std)


def features(ctx: RunContext, subject: Subject, split: str,
             together: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Cached `(features, labels)` of one split for one subject; `together`: extracted by
    every process of the process group at once (`share_features`)."""
    memo = ctx.cache.setdefault("features", {})
    if (subject.name, split) in memo:
        return memo[(subject.name, split)]
    dataset = getattr(ctx.data, split)
    transform = transform_for(subject, ctx)
    loader = torch.utils.data.DataLoader(
        TransformedDataset(dataset, transform), batch_size=ctx.recipe.eval.batch_size,
        num_workers=ctx.recipe.data.num_workers,
    )
    model = subject.backbone if subject.backbone is not None else torch.nn.Flatten()
    precision = ctx.recipe.eval.feature_precision
    key = cache_key(f"{subject.name}:{subject_weights_sha(ctx, subject)}", transform,
                    split_key(ctx.data, split, data_fingerprint(ctx)), precision)
    progress = bar(ctx, f"features {split}", subject)
    device = eval_device(ctx)
    start = time.time()
    model = model.to(device)
    if ctx.recipe.trainer.channels_last:
        channels_last(model)
    x, y, from_cache = cached_features(model, loader, Path(ctx.recipe.eval.cache_dir),
                                       key, device, progress, together, precision)
    if not from_cache:
        ctx.count_images(len(dataset), time.time() - start)
    memo[(subject.name, split)] = (x, y)
    return x, y


def eval_device(ctx: RunContext) -> str:
    """Where the evaluation computes: the run's GPU when it trains on GPUs, else the CPU."""
    return "cuda" if ctx.resolved.accelerator == "gpu" else "cpu"


def subject_weights_sha(ctx: RunContext, subject: Subject) -> str:
    """The hash of a subject's weights (raw pixels: of none), computed once per run."""
    hashes = ctx.cache.setdefault("weights_sha", {})
    if subject.name not in hashes:
        hashes[subject.name] = weights_hash(
            subject.backbone if subject.backbone is not None else torch.nn.Flatten())
    return hashes[subject.name]


def data_fingerprint(ctx: RunContext) -> str:
    """`fingerprint_of` the run's data, computed once per run."""
    if "data_fingerprint" not in ctx.cache:
        ctx.cache["data_fingerprint"] = fingerprint_of(ctx.recipe.data, ctx.data)
    return ctx.cache["data_fingerprint"]


def fingerprint_of(data_cfg, bundle) -> str:
    """Which data a split hash's indices point into: the recipe's data settings (dataset,
    root, subset, bands, ...), where it was read from (with the size and modification time of
    a source file or folder) and its classes. Two datasets with the same split sizes have the
    same split hashes; this keeps their cached features and baseline results apart."""
    source = Path(bundle.source.split(" (")[0])
    try:
        stat = source.stat()
        where = [str(source.resolve()), stat.st_size, stat.st_mtime_ns]
    except OSError:
        where = [bundle.source]
    settings = data_cfg.model_dump(mode="json", exclude={"num_workers", "decode"})
    parts = {"settings": settings, "source": where, "classes": bundle.class_names,
             "num_classes": bundle.num_classes, "multi_label": bundle.multi_label,
             "bands": bundle.bands, "channels": bundle.channels}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_key(bundle, split: str, fingerprint: str) -> str:
    """What identifies a split's samples in the feature cache: its indices and its data."""
    return f"{bundle.split_hashes[split]}|{fingerprint}"


def share_features(ctx: RunContext) -> None:
    """Extract every backbone's features of every split together, in all processes of a
    process group (each its shard; see features.py), before rank 0 evaluates alone.

    Called by the pipeline in every process, at the first evaluation stage still to run.
    Rank 0 chooses the subjects (it reads the exported backbone) and sends them to the
    others, so all extract with the same weights without sharing a file system.
    """
    rank, world = process_group()
    if world == 1 or not ctx.data.labeled:
        return
    sent = [[(s.name, s.backbone) for s in subjects(ctx) if s.backbone is not None]
            if rank == 0 else None]
    torch.distributed.broadcast_object_list(sent, src=0)
    if rank == 0 and not ctx.quiet:
        print(f"features: {world} processes extract each split together, a shard each",
              flush=True)
    ctx.cache["shared_subjects"] = dict(sent[0])  # what the others fine-tune, by name
    for name, backbone in sent[0]:
        for split in SPLITS:
            if getattr(ctx.data, split) is not None:
                features(ctx, Subject(name, backbone), split, together=True)


def split_features(ctx: RunContext, subject: Subject) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {split: features(ctx, subject, split) for split in SPLITS}
    if subject.backbone is None:  # raw pixels: centred on the train mean, as a k-NN needs
        mean = out["train"][0].mean(0, keepdims=True)
        out = {s: (x - mean, y) for s, (x, y) in out.items()}
    return out


def bar(ctx: RunContext, step: str, subject: Subject) -> str | None:
    """The name of a progress bar for one step on one subject; None when the run is quiet."""
    return None if ctx.quiet else f"{step} {subject.name}"


def preprocessing(ctx: RunContext, backbone: Backbone) -> dict[str, Any]:
    """What the evaluation fed the backbone (its own resolution and normalization) beside the
    data's own; warns once per run when they differ, e.g. an ImageNet backbone on 28-px
    medical images."""
    p, d = backbone.preprocessing, ctx.resolved.data
    used = {"image_size": p.input_size, "mean": [round(m, 4) for m in p.mean],
            "std": [round(v, 4) for v in p.std]}
    native = {"image_size": d["image_size"], "mean": [round(m, 4) for m in d["mean"]],
              "std": [round(v, 4) for v in d["std"]]}
    differs = used != native
    if differs and not ctx.cache.get("preprocessing_warned"):
        ctx.cache["preprocessing_warned"] = True
        message = (f"evaluation preprocessing differs from the data's: the backbone gets "
                   f"{used['image_size']} px with its normalization (mean {used['mean']}, std "
                   f"{used['std']}); {ctx.data.name} is {native['image_size']} px, mean "
                   f"{native['mean']}, std {native['std']}. Both are recorded in results.json")
        warnings.warn(message, UserWarning, stacklevel=2)
        if not ctx.quiet:
            print(f"warning: {message}", flush=True)
    adapted = {"input_channels": ctx.cache["input_channels"]} if "input_channels" in ctx.cache else {}
    return {"evaluation": used, "data": native, "differs": differs, **adapted}


def require_labels(ctx: RunContext, stage: str) -> None:
    if not ctx.data.labeled or ctx.data.test is None or ctx.data.val is None:
        raise SSLPipelineError(
            f"stage {stage} needs labeled train, val and test splits; {ctx.data.name} has none. "
            "Evaluate on a labeled dataset (e.g. --set data.name=...) or drop the stage"
        )


def evaluate_subjects(ctx: RunContext, stage: str, evaluate) -> dict[str, Any]:
    """Run `evaluate(ctx, subject)` for the backbone and every baseline; baselines are filed
    under results["baselines"][name][stage], the backbone's result is returned."""
    require_labels(ctx, stage)
    main = {}
    for subject in subjects(ctx):
        if subject.name == "backbone":
            result = evaluate(ctx, subject)
        else:
            result = baseline_result(ctx, stage, subject, evaluate)
        if result is None:
            continue
        if subject.name == "backbone":
            main = {**result, "preprocessing": preprocessing(ctx, subject.backbone)}
            map_embeddings(ctx, subject)
        else:
            ctx.baselines.setdefault(subject.name, {})[stage] = result
    return main


def baseline_result(ctx: RunContext, stage: str, subject: Subject, evaluate) -> dict[str, Any] | None:
    """A baseline's result for `stage`, reused from `<eval.cache_dir>/baselines/` when an
    earlier run evaluated exactly this baseline (same weights, data splits, eval transform,
    evaluation settings, seed, precision and package code), e.g. the other variants of a suite;
    computed and stored otherwise. Reused results carry `"reused": true`.
    `eval.reuse_baselines: false` always recomputes."""
    if not ctx.recipe.eval.reuse_baselines:
        return evaluate(ctx, subject)
    path = Path(ctx.recipe.eval.cache_dir) / "baselines" / f"{result_key(ctx, stage, subject)}.json"
    if path.is_file():
        try:
            return {**json.loads(path.read_text()), "reused": True}
        except (OSError, json.JSONDecodeError):
            pass  # a torn entry: computed again and rewritten below
    result = evaluate(ctx, subject)
    if result is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(result))
    return result


# Evaluation settings that do not change a result: which backbone and baselines are evaluated,
# where features and baselines are kept, whether baselines are reused, checkpoint frequency.
EVAL_KEYS_NOT_IN_RESULTS = ("backbone", "baselines", "cache_dir", "reuse_baselines",
                            "checkpoint_minutes")


def result_key(ctx: RunContext, stage: str, subject: Subject) -> str:
    """Everything an evaluation result of `subject` under the name `stage` depends on, hashed:
    the code that computed it too (a stored baseline, a kept fine-tuning run)."""
    recipe = ctx.recipe
    parts = {
        "stage": stage,
        "subject": subject.name,
        "weights": subject_weights_sha(ctx, subject),
        "transform": repr(transform_for(subject, ctx)),
        "splits": ctx.resolved.data.get("split_hashes"),
        "data": data_fingerprint(ctx),
        "eval": recipe.eval.model_dump(mode="json", exclude=set(EVAL_KEYS_NOT_IN_RESULTS)),
        "seed": recipe.seed,
        "precision": ctx.resolved.precision,
        "version": ssl_pipeline.__version__,
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def map_embeddings(ctx: RunContext, subject: Subject) -> None:
    """The 2-D map of the backbone's test embeddings for the report, made once per invocation
    (so it always shows the backbone this invocation evaluated). Multi-label data keeps each
    point's label vector; the report draws one panel per label."""
    if ctx.cache.get(EMBEDDING_MAP):
        return
    x, y = features(ctx, subject, "test")
    ctx.cache[EMBEDDING_MAP] = write_embedding_map(ctx.run_dir, x, y, seed=ctx.recipe.seed)


# ------------------------------------------------------------------ stages


def knn_result(ctx: RunContext, subject: Subject) -> dict[str, Any]:
    f = split_features(ctx, subject)
    settings = ctx.recipe.eval.knn.settings
    ks = tuple(k for k, _ in settings)
    scores = knn_classify(*f["train"], f["test"][0], ctx.data.num_classes, ks=ks,
                          temperature=dict(settings), progress=bar(ctx, "knn", subject),
                          search=ctx.recipe.eval.knn.search)
    by_k = {}
    for k in ks:
        metrics = classification_metrics(scores[k], f["test"][1],
                                         multi_label_scores="probabilities")
        by_k[str(k)] = {m: metrics[m] for m in ("top1", "top5", "auc") if m in metrics}
        by_k[str(k)]["temperature"] = dict(settings)[k]
    headline = classification_metrics(scores[ks[0]], f["test"][1], ctx.data.class_names,
                                      multi_label_scores="probabilities")
    return {**headline, "k": ks[0], "temperature": settings[0][1], "by_k": by_k}


def probe_result(ctx: RunContext, subject: Subject) -> dict[str, Any]:
    f = split_features(ctx, subject)
    cfg = ctx.recipe.eval.linear_probe
    return linear_probe(*f["train"], *f["val"], *f["test"], ctx.data.num_classes,
                        grid={"lr": tuple(cfg.lr_grid), "weight_decay": tuple(cfg.weight_decay_grid)},
                        seeds=ctx.recipe.eval.seeds, epochs=cfg.epochs, batch_size=cfg.batch_size,
                        device=eval_device(ctx), progress=bar(ctx, "linear probe", subject),
                        max_minutes=cfg.max_minutes)


def few_shot_result(ctx: RunContext, subject: Subject) -> dict[str, Any]:
    f = split_features(ctx, subject)
    cfg = ctx.recipe.eval.few_shot
    result = few_shot(*f["train"], *f["test"], ctx.data.num_classes, shots=tuple(cfg.shots),
                      seeds=cfg.seeds, progress=bar(ctx, "few-shot", subject),
                      max_minutes=cfg.max_minutes)
    if cfg.vtab_1k:
        result["vtab_1k"] = vtab_1k(*f["train"], *f["val"], *f["test"], seeds=cfg.seeds,
                                    progress=bar(ctx, "few-shot", subject))
    return result


def _register_stages() -> None:
    """Each evaluation stage is `evaluate_subjects` with its own per-subject function."""
    for name, result in [("knn", knn_result), ("linear_probe", probe_result),
                         ("few_shot", few_shot_result), ("finetune", finetune_result),
                         ("linear_probe_classic", classic_probe_result)]:
        stage_registry.register(name, STAGE_DESCRIPTIONS[name], prepare=share_features,
                                # after DDP pretraining every process trains these (together.py)
                                trains_together=name in ("finetune", "linear_probe_classic"))(
            partial(evaluate_subjects, stage=name, evaluate=result))


# ------------------------------------------------------------------ fine-tuning


def finetune_result(ctx: RunContext, subject: Subject) -> dict[str, Any] | None:
    if subject.backbone is None:
        return None  # raw pixels have nothing to fine-tune
    cfg, seeds = ctx.recipe.eval.finetune, ctx.recipe.eval.seeds
    by_fraction = {}
    for fraction in cfg.label_fractions:
        runs = [kept_run(ctx, subject, f"finetune/{subject.name}/{fraction}/seed{seed}",
                         partial(finetune_once, ctx, subject, fraction, seed))
                for seed in range(seeds if fraction < 1.0 else cfg.full_data_seeds)]
        top1 = [r["top1"] for r in runs]
        aucs = [r.get("auc") for r in runs]
        by_fraction[str(fraction)] = {
            **mean_and_std(top1),
            "auc": None if None in aucs else float(np.mean(aucs)),
            "seeds": len(runs), "train_samples": runs[0]["train_samples"],
            "epochs": cfg.epochs_for(fraction),
            "validated_epochs": len(validated_epochs(cfg.epochs_for(fraction), cfg.validations)),
            "subset": runs[0]["subset"], "by_seed": runs,
            "stopped_by_budget": any(r["stopped_by_budget"] for r in runs),
            **chosen_settings(runs),
        }
    headline = by_fraction[str(max(cfg.label_fractions))]
    return {"top1": headline["top1"], "top1_std": headline["top1_std"], "auc": headline["auc"],
            **{k: headline[k] for k in ("chosen",) if k in headline},
            "by_fraction": by_fraction,
            "stopped_by_budget": any(f["stopped_by_budget"] for f in by_fraction.values())}


def kept_run(ctx: RunContext, subject: Subject, name: str, compute) -> dict[str, Any]:
    """`compute(scratch)`, a fine-tuning run's result, kept in `<run dir>/runs/<name>.json`
    once it finishes: a stage killed part-way and resumed (`--resume`) does not redo the runs it
    had finished. A kept result counts only under the same `result_key` (weights, data,
    transform, evaluation settings, seed, precision, code); anything else is computed again.

    `scratch` (`<name>.partial/`) holds the unfinished run's epoch checkpoints, so the run
    itself goes on from its last finished epoch; it is emptied when its key differs and
    removed once the result is kept."""
    path = ctx.run_dir / "runs" / f"{name}.json"
    key = result_key(ctx, name, subject)
    try:
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return kept["result"]
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or torn: computed below
    scratch = path.with_suffix(".partial")
    if (scratch / "key").exists() and (scratch / "key").read_text() != key:
        shutil.rmtree(scratch)  # another backbone's, or other settings': of no use
    scratch.mkdir(parents=True, exist_ok=True)
    write_text_atomic(scratch / "key", key)
    result = compute(scratch)
    write_text_atomic(path, json.dumps({"key": key, "result": result}))
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def chosen_settings(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"chosen": {"lr": ..., "backbone_lr_ratio": ...}}` when the runs chose from a grid on
    validation: one value where every seed chose the same, else each seed's in seed order."""
    if not any("grid" in r for r in runs):
        return {}
    chosen = {}
    for key in ("lr", "backbone_lr_ratio"):
        values = [r[key] for r in runs]
        chosen[key] = values[0] if len(set(values)) == 1 else values
    return {"chosen": chosen}


def mean_and_std(top1: list[float]) -> dict[str, float]:
    """`top1` (mean) and `top1_std` (sample standard deviation; 0 for one run) over runs."""
    return {"top1": float(np.mean(top1)),
            "top1_std": float(np.std(top1, ddof=1)) if len(top1) > 1 else 0.0}


def classic_probe_result(ctx: RunContext, subject: Subject) -> dict[str, Any] | None:
    """SimSiam's / MoCo's linear probe protocol, for numbers comparable with the papers'."""
    if subject.backbone is None:
        return None  # raw pixels have no backbone to freeze
    cfg = ctx.recipe.eval.linear_probe_classic
    runs = [kept_run(ctx, subject, f"linear_probe_classic/{subject.name}/seed{seed}",
                     partial(finetune_once, ctx, subject, 1.0, seed, classic=True))
            for seed in range(cfg.seeds)]
    top1 = [r["top1"] for r in runs]
    return {
        **mean_and_std(top1),
        "seeds": len(runs), "by_seed": runs, "lr": runs[0]["lr"], "batch_size": runs[0]["batch_size"],
        "protocol": (f"frozen backbone in eval mode, random resized crops + flips, {cfg.optimizer}, "
                     f"lr {runs[0]['lr']:g}, batch {runs[0]['batch_size']}, {cfg.epochs} epochs, "
                     f"eval resize {cfg.crop_pct:g} + center crop; epoch chosen on val"),
        "stopped_by_budget": any(r["stopped_by_budget"] for r in runs),
    }


@dataclass
class FinetunePlan:
    """One fine-tuning (or classic-probe) run's data and settings: what `finetune_once` trains
    and `ssl-pipeline estimate` times."""
    name: str  # the run's name under runs/ and in metrics.jsonl
    train: torch.utils.data.Dataset  # the label fraction's images
    subset: str  # how they were drawn
    batch: int
    loaders: list[torch.utils.data.DataLoader]  # train (augmented, seeded), val, test
    grid: list[FinetuneSettings]  # one per (lr, backbone_lr_ratio) pair


def finetune_plan(ctx: RunContext, subject: Subject, fraction: float, seed: int,
                  classic: bool = False, shard: bool = False) -> FinetunePlan:
    """`shard`: the processes of the process group train together, the train loader giving
    this process its share of each batch (the batch rounded down to a multiple of them)."""
    cfg, bundle = ctx.recipe.eval.finetune, ctx.data
    probe = ctx.recipe.eval.linear_probe_classic
    p = subject.backbone.preprocessing
    train = bundle.train
    subset = "all"
    if fraction < 1.0 and fraction in cfg.subset_files:
        positions, subset = listed_subset(bundle.train, cfg.subset_files[fraction])
        train = torch.utils.data.Subset(train, positions)
    elif fraction < 1.0:
        train = torch.utils.data.Subset(train, balanced_subset(bundle.train.labels, fraction=fraction, seed=seed))
        subset = "random, seeded (multi-label)" if bundle.multi_label else "class-balanced, seeded"
    views = fit_views(p.input_size, p.in_chans, {"crop_min_scale": 0.08} if classic else {})
    augment = supervised_train_transform(views, p.input_size, p.mean, p.std)
    plain = transform_for(subject, ctx)  # (also checks the channels)
    if classic:  # the papers' evaluation crop: resize 256, center crop 224
        plain = eval_transform(p.input_size, p.mean, p.std, probe.crop_pct)
    workers = ctx.recipe.data.num_workers
    loaders = [
        seeded_train_loader(train, augment, probe.batch_size if classic else cfg.batch_size,
                            ctx.recipe.seed + seed, workers, shard=shard),
        *(torch.utils.data.DataLoader(TransformedDataset(split, plain), batch_size=ctx.recipe.eval.batch_size,
                                      num_workers=workers) for split in (bundle.val, bundle.test)),
    ]
    # the batch each step takes: capped at the images, and with `shard` each process's share
    # of it (the whole rounded down to a multiple of the processes)
    batch = loaders[0].batch_size * (process_group()[1] if shard else 1)
    if classic:
        lr = probe.lr * batch / probe.lr_reference_batch
        grid = [FinetuneSettings(probe.epochs, probe.optimizer, lr, 0.0, probe.weight_decay,
                                 probe.max_minutes, frozen=True)]
        name = f"linear_probe_classic/{subject.name}/seed{seed}"
    else:
        grid = [FinetuneSettings(cfg.epochs_for(fraction), cfg.optimizer, lr, ratio, cfg.weight_decay,
                                 cfg.max_minutes, validations=cfg.validations)
                for lr in as_grid(cfg.lr) for ratio in as_grid(cfg.backbone_lr_ratio)]
        name = f"finetune/{subject.name}/{fraction}/seed{seed}"
    return FinetunePlan(name, train, subset, batch, loaders, grid)


def finetune_once(ctx: RunContext, subject: Subject, fraction: float, seed: int,
                  scratch: Path | None = None, classic: bool = False) -> dict[str, Any]:
    """One fine-tuning run, or one per (lr, backbone_lr_ratio) pair of a grid with the pair
    best on validation reported; `classic`: the classic linear probe instead (frozen backbone).
    With `scratch`, each setting's epoch checkpoints go there and a rerun goes on from them."""
    bundle = ctx.data
    together = ctx.cache.get("fit_group")  # after DDP pretraining: every process trains
    plan = finetune_plan(ctx, subject, fraction, seed, classic, shard=together is not None)
    grid, loaders = plan.grid, plan.loaders
    tried, best = [], None
    minutes = ctx.recipe.eval.checkpoint_minutes
    for i, settings in enumerate(grid):
        checkpoint = None if scratch is None or minutes is None else scratch / f"setting{i}.ckpt"
        torch.manual_seed(ctx.recipe.seed + seed)  # every setting: the same head init and batches
        backbone = copy.deepcopy(subject.backbone).train()
        stage = plan.name if len(grid) == 1 else \
            f"{plan.name}/lr{settings.lr:g}_ratio{settings.backbone_lr_ratio:g}"
        model, fit = fit_finetuner(backbone, bundle.num_classes, *loaders[:2], settings,
                                   finetune_trainer_kwargs(ctx, stage), bundle.multi_label,
                                   checkpoint=checkpoint, checkpoint_minutes=minutes or 0.0,
                                   metrics=ctx.run_dir / "metrics.jsonl", stage=stage,
                                   quiet=ctx.quiet, together=together,
                                   order=FitOrder(subject.name, fraction, seed, classic, i))
        this_call = fit.pop("this_call")
        ctx.count_images(len(plan.train) * this_call["epochs"], this_call["seconds"])  # training images
        tried.append({"lr": settings.lr, "backbone_lr_ratio": settings.backbone_lr_ratio, **fit})
        if best is None or fit["val_top1"] > best[1]["val_top1"]:  # ties: the earlier setting
            best = (model, fit, settings)
        del model
    model, fit, settings = best
    result = {**held_out_metrics(model, loaders[2], bundle.class_names), **fit,
              "seconds": round(sum(t["seconds"] for t in tried), 2),  # every setting's training
              "stopped_by_budget": any(t["stopped_by_budget"] for t in tried)}
    if len(grid) > 1:
        result["grid"] = [{k: t[k] for k in ("lr", "backbone_lr_ratio", "val_top1", "best_epoch")}
                          for t in tried]
    return {"seed": seed, "train_samples": len(plan.train), "subset": plan.subset, "lr": settings.lr,
            **({} if classic else {"backbone_lr_ratio": settings.backbone_lr_ratio}),
            "batch_size": plan.batch, "processes": together.world if together is not None else 1,
            **result}


def as_grid(value: float | list[float]) -> list[float]:
    """A recipe value that is one number or a list of them to choose from, as a list."""
    return list(value) if isinstance(value, list) else [value]


def finetune_trainer_kwargs(ctx: RunContext, stage: str | None) -> dict[str, Any]:
    """Lightning Trainer arguments of one fine-tuning run, logging under `stage` (None: not
    logging, a process training beside rank 0)."""
    shown = stage is not None and not ctx.quiet and on_terminal(sys.stdout)
    return dict(accelerator=ctx.resolved.accelerator, devices=fit_devices(ctx.resolved.accelerator),
                precision=ctx.resolved.precision, deterministic=ctx.recipe.trainer.deterministic,
                logger=[JSONLLogger(ctx.run_dir / "metrics.jsonl", stage=stage)] if stage else False,
                enable_progress_bar=shown,
                enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                callbacks=[ChannelsLast()] if ctx.recipe.trainer.channels_last else [])


def trains_together(ctx: RunContext) -> bool:
    """Whether every process of a process group trains each fine-tuning run
    (`eval.finetune_processes`: "all", or "auto" on GPUs), else rank 0 alone."""
    choice = ctx.recipe.eval.finetune_processes
    return choice == "all" or (choice == "auto" and ctx.resolved.accelerator == "gpu")


def train_shares(ctx: RunContext, group: FitGroup) -> int:
    """A process other than rank 0, after DDP pretraining: train its share of each fit rank 0
    orders (see evals/together.py) until rank 0 says there are no more; returns how many."""
    subjects_by_name = ctx.cache.get("shared_subjects", {})
    fits = 0
    while (order := group.receive()) is not None:
        subject = Subject(order.subject, subjects_by_name[order.subject])
        plan = finetune_plan(ctx, subject, order.fraction, order.seed, order.classic, shard=True)
        torch.manual_seed(ctx.recipe.seed + order.seed)  # as rank 0 (which also sends its weights)
        backbone = copy.deepcopy(subject.backbone).train()
        with tempfile.TemporaryDirectory(prefix="ssl_pipeline_fit_") as tmp:
            resume_from = None
            if order.checkpoint is not None:  # rank 0's, whatever file system this process sees
                resume_from = Path(tmp) / "resume.ckpt"
                resume_from.write_bytes(order.checkpoint)
            fit_finetuner(backbone, ctx.data.num_classes, plan.loaders[0], None,
                          plan.grid[order.setting], finetune_trainer_kwargs(ctx, None),
                          ctx.data.multi_label, together=group, resume_from=resume_from)
        fits += 1
    return fits


_register_stages()
