"""`run(recipe)`: the recipe's stages in order, into one run directory."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ssl_pipeline import evaluation as _evaluation  # noqa: F401  (registers the eval stages)
from ssl_pipeline import pretrain as _pretrain  # noqa: F401  (registers the pretrain stage)
from ssl_pipeline.atomic import write_text_atomic
from ssl_pipeline.compute import resolve_precision
from ssl_pipeline.data.image_folder import decoder_facts
from ssl_pipeline.data.transforms import fit_views
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.evals.together import FitGroup
from ssl_pipeline.evaluation import train_shares, trains_together
from ssl_pipeline.features import process_group
from ssl_pipeline.methods.base import effective_lr
from ssl_pipeline.names import MONITOR_METRICS
from ssl_pipeline.provenance import provenance
from ssl_pipeline.recipe import (
    Recipe,
    dump_recipe,
    load_recipe,
    read_yaml,
    recipe_from_dict,
)
from ssl_pipeline.stages import (
    Resolved,
    RunContext,
    is_global_zero,
    launched_processes,
    stage_registry,
)
from ssl_pipeline.tracking import record_stage, stage_history

__all__ = ["RunResult", "run", "stage_registry"]

# Rank 0 picks the run directory and hands it to the processes Lightning's DDP launcher starts.
RUN_DIR_ENV = "SSL_PIPELINE_RUN_DIR"


class StageFailed(RuntimeError):
    """A stage raised something that is not the user's input: exit status 1."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(error).__name__}: {error}")
        self.stage = stage
        self.error = error


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]
    seconds: float


def run(
    recipe: Recipe | str | os.PathLike | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | os.PathLike | None = None,
    quiet: bool = False,
    resume: str | os.PathLike | None = None,
) -> RunResult:
    """Run every stage the recipe lists, in order; returns the run directory and results.

    `resume` continues an earlier run directory from its own recipe.yaml: finished stages
    are skipped and pretraining continues from checkpoints/last.ckpt.
    """
    start = time.time()
    recipe, run_dir = _recipe_and_dir(recipe, overrides, out_dir, resume)
    _quiet_lightning()
    resolved = resolve(recipe)
    ctx = RunContext(recipe, run_dir, resolved, quiet=quiet, resuming=resume is not None)
    resolved.data = data_facts(ctx)  # builds the dataset: bad data fails before any write
    views = fit_views(resolved.data["image_size"], resolved.data["channels"], recipe.views.model_dump())
    resolved.views = asdict(views)
    handed_over = is_global_zero() and resolved.world_size > 1 and RUN_DIR_ENV not in os.environ
    if handed_over:
        os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the processes DDP launches
    try:
        return _run_stages(ctx, start)
    finally:
        if handed_over:
            os.environ.pop(RUN_DIR_ENV, None)


def _run_stages(ctx: RunContext, start: float) -> RunResult:
    recipe, run_dir = ctx.recipe, ctx.run_dir
    if is_global_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        recipe = recipe.model_copy(update={"resolved": asdict(ctx.resolved)})
        ctx.recipe = recipe
        write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))

    results = _load_results(run_dir)
    ctx.baselines = results.setdefault("baselines", {})
    done = ctx.stage_state()
    shared = False
    # rank 0 failing in a stage tells the others nothing: they fail as its connections close
    for stage in recipe.stages:
        if not _run_stage(ctx, stage, results, done, shared):
            break
        shared = shared or not stage_registry.get(stage).extra.get("distributed")
    group = ctx.cache.pop("fit_group", None)
    if group is not None and is_global_zero():
        group.send(None)  # no more fits for the other processes: they end
    if ctx.cache.pop("own_process_group", False):
        torch.distributed.destroy_process_group()
    if is_global_zero():
        _write_report(ctx, results)
    return RunResult(run_dir, results, time.time() - start)


def _run_stage(ctx: RunContext, stage: str, results: dict[str, Any], done: dict, shared: bool) -> bool:
    """Run one stage (or skip it, done already); False when this process has no more to run."""
    recipe, run_dir, quiet = ctx.recipe, ctx.run_dir, ctx.quiet
    if not stage_registry.get(stage).extra.get("distributed"):
        if not shared:  # the first evaluation stage: the processes extract features together
            _prepare_together(ctx, recipe.stages, ctx.stage_state())
        if not is_global_zero():
            # only rank 0 evaluates; the others train their share of each fine-tuning run
            group = ctx.cache.pop("fit_group", None)
            if group is not None:
                train_shares(ctx, group)
            return False
    if done.get(stage, {}).get("status") == "done":
        _say(quiet, f"stage {stage}: already done, skipped")
        return True
    _say(quiet, f"stage {stage}: running")
    t0 = time.time()
    ctx.throughput.update(images=0, seconds=0.0)
    try:
        results[stage] = stage_registry.get(stage).obj(ctx)
    except (SSLPipelineError, KeyboardInterrupt):
        raise
    except Exception as err:
        ctx.mark_stage(stage, status="failed", error=f"{type(err).__name__}: {err}")
        raise StageFailed(stage, err) from err
    seconds = time.time() - t0
    ctx.mark_stage(stage, status="done", seconds=round(seconds, 2),
                   **_images_per_second(ctx, results[stage]))
    if is_global_zero():
        _write_results(run_dir, results, ctx)
        _track_stage(ctx, stage, results[stage], seconds)
    return True


def _prepare_together(ctx: RunContext, stages: list[str], done: dict) -> None:
    """In a process group (after DDP pretraining), every process runs the `prepare` hooks of
    the evaluation stages still to run (feature extraction, sharded), before rank 0 goes on
    alone. Rank 0 says which stages those are: the others may not see its run directory."""
    join_launched_processes(ctx)
    rank, world = process_group()
    if world == 1:
        return
    pending = [[s for s in stages if not stage_registry.get(s).extra.get("distributed")
                and done.get(s, {}).get("status") != "done"] if rank == 0 else None]
    torch.distributed.broadcast_object_list(pending, src=0)
    hooks = []
    for stage in pending[0]:
        hook = stage_registry.get(stage).extra.get("prepare")
        if hook is not None and hook not in hooks:
            hooks.append(hook)
    for hook in hooks:
        hook(ctx)
    if trains_together(ctx) and any(stage_registry.get(s).extra.get("trains_together")
                                     for s in pending[0]):
        ctx.cache["fit_group"] = FitGroup()  # rank 0's orders for the fine-tuning fits
        if rank == 0 and not ctx.quiet:
            print(f"fine-tuning: {world} processes train each run together, a share of each batch",
                  flush=True)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def join_launched_processes(ctx: RunContext) -> None:
    """Processes torchrun started for a run with no pretraining to do (`ssl-pipeline evaluate`,
    a resumed run whose pretraining is done): Lightning set up no process group for them, so
    this does (NCCL on GPUs, else gloo), and they extract features and fine-tune together as
    after DDP pretraining. Without torchrun's variables (srun alone) rank 0 evaluates alone."""
    if process_group()[1] > 1 or launched_processes() < 2:
        return
    if not all(v in os.environ for v in TORCHRUN_VARIABLES):
        if is_global_zero() and not ctx.quiet:
            print(f"evaluation: {launched_processes()} processes were launched without torchrun's "
                  f"variables ({', '.join(TORCHRUN_VARIABLES)}); rank 0 evaluates alone", flush=True)
        return
    gpu = ctx.resolved.accelerator == "gpu" and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if gpu else "gloo")
    ctx.cache["own_process_group"] = True


def _images_per_second(ctx: RunContext, result: dict[str, Any]) -> dict[str, float]:
    """Images per second of the stage's network passes (training, or feature extraction when
    the features were not already cached); nothing when the stage computed no images."""
    if (result or {}).get("images_per_second") is not None:  # pretraining measures its own
        return {"images_per_second": result["images_per_second"]}
    images, seconds = ctx.throughput["images"], ctx.throughput["seconds"]
    return {"images_per_second": round(images / seconds, 1)} if images and seconds > 0 else {}


def _track_stage(ctx: RunContext, stage: str, result: dict[str, Any], seconds: float) -> None:
    """The stage's numbers into metrics.jsonl, and into the stage's own W&B run; pretraining
    logged its steps to both while it ran."""
    metrics = ctx.run_dir / "metrics.jsonl"
    record_stage(metrics, stage, result, ctx.baselines, seconds)
    if stage != "pretrain":
        ctx.tracker.log_stage(stage, result, ctx.baselines, stage_history(metrics, stage))


def _write_report(ctx: RunContext, results: dict[str, Any]) -> None:
    """report.md / report.html / plots; a failure here warns and never costs the results."""
    from ssl_pipeline.report import result_rows, write_report

    try:
        written = write_report(ctx.run_dir)
    except Exception as err:  # the results are already on disk
        warnings.warn(f"could not write the report for {ctx.run_dir}: {type(err).__name__}: {err}")
        return
    ctx.tracker.log_report(written["plots"], result_rows(results))


def _recipe_and_dir(recipe, overrides, out_dir, resume) -> tuple[Recipe, Path]:
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "recipe.yaml").is_file():
            raise SSLPipelineError(
                f"--resume {run_dir}: no recipe.yaml there; pass a run directory written by "
                "`ssl-pipeline run` (reports/<recipe>/<timestamp>/)"
            )
        raw = read_yaml(run_dir / "recipe.yaml")
        raw.pop("resolved", None)
        return recipe_from_dict(raw, source=str(run_dir / "recipe.yaml")), run_dir
    if recipe is None:
        raise SSLPipelineError("give a recipe file (e.g. recipes/quickstart.yaml) or --resume RUN_DIR")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise SSLPipelineError("overrides apply to recipe files; set fields on the Recipe object instead")
    if os.environ.get(RUN_DIR_ENV):  # a DDP worker process: rank 0 chose the directory
        return recipe, Path(os.environ[RUN_DIR_ENV])
    if out_dir is None and launched_processes() > 1:
        raise SSLPipelineError(
            f"{launched_processes()} processes were started by torchrun or srun, and each would "
            "pick its own run directory; pass the same --out DIR to all of them"
        )
    if out_dir is not None:
        if any((Path(out_dir) / name).exists() for name in ("results.json", "run_state.json")):
            # Never mix two runs in one directory, and never overwrite what the first one wrote.
            raise SSLPipelineError(
                f"--out {out_dir} already holds a run; continue it with "
                f"`ssl-pipeline run --resume {out_dir}`, or choose a new --out directory"
            )
        return recipe, Path(out_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return recipe, Path("reports") / (recipe.name or "run") / stamp


def resolve(recipe: Recipe) -> Resolved:
    """Devices, world size, per-device batch, effective learning rate and precision, checked."""
    t, p = recipe.trainer, recipe.pretrain
    has_gpu = torch.cuda.is_available()
    accelerator = t.accelerator if t.accelerator != "auto" else ("gpu" if has_gpu else "cpu")
    if accelerator == "gpu" and not has_gpu:
        raise SSLPipelineError(
            "trainer.accelerator=gpu but this machine has no visible GPU; "
            "use --set trainer.accelerator=cpu (or auto)"
        )
    if t.precision == "16-mixed" and accelerator == "cpu":
        raise SSLPipelineError(
            "trainer.precision=16-mixed needs a GPU; on CPU use auto, bf16-mixed or 32"
        )
    devices = t.devices if t.devices != "auto" else (torch.cuda.device_count() if accelerator == "gpu" else 1)
    world = devices * t.num_nodes
    if t.sync_batchnorm and accelerator == "cpu" and max(world, launched_processes()) > 1:
        raise SSLPipelineError(
            "trainer.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm has no CPU kernel. "
            "On CPU, set trainer.sync_batchnorm=false (each process normalizes over its own "
            "batch), or backbone.batchnorm=false"
        )
    per_step = world * t.accumulate_grad_batches
    if p.batch_size % per_step:
        raise SSLPipelineError(
            f"pretrain.batch_size={p.batch_size} is global and must divide evenly over "
            f"{world} device(s) x {t.accumulate_grad_batches} accumulation step(s); "
            f"use a multiple of {per_step}"
        )
    lr = effective_lr(p.lr, p.batch_size, p.lr_reference_batch, p.lr_scaling)
    return Resolved(accelerator, devices, world, p.batch_size // per_step, lr,
                    precision=resolve_precision(t.precision, accelerator))


def data_facts(ctx: RunContext) -> dict[str, Any]:
    bundle = ctx.data
    files = ctx.recipe.data.name in ("image_folder", "webdataset")  # image files, decoded per item
    decoder = {"decoder": decoder_facts(ctx.recipe.data.decode)} if files else {}
    return {
        "name": bundle.name,
        "source": bundle.source,
        "channels": bundle.channels,
        "image_size": bundle.image_size,
        "mean": list(bundle.mean),
        "std": list(bundle.std),
        "num_classes": bundle.num_classes,
        "class_names": bundle.class_names,
        "sizes": {s: len(getattr(bundle, s)) for s in ("train", "val", "test") if getattr(bundle, s) is not None},
        "split_hashes": bundle.split_hashes,
        **decoder,
        **({"skipped_images": bundle.skipped_images} if bundle.skipped_images else {}),
        **({"bands": bundle.bands} if bundle.bands else {}),
        **({"multi_label": True} if bundle.multi_label else {}),
    }


def _load_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _write_results(run_dir: Path, results: dict[str, Any], ctx: RunContext) -> None:
    results["schema_version"] = 1
    results["provenance"] = {**provenance(), "split_hashes": ctx.resolved.data.get("split_hashes")}
    write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2))


def _quiet_lightning() -> None:
    """Lightning's start-up banner (GPU/TPU availability, tips) says nothing our users need."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _say(quiet: bool, message: str) -> None:
    if not quiet and is_global_zero():
        print(message, flush=True)


def summary(result: RunResult) -> str:
    """The few lines the CLI prints at the end of a run."""
    lines = [f"done in {result.seconds:.1f} s; run directory: {result.run_dir}"]
    if (result.run_dir / "report.html").exists():
        lines.append(f"  report: {result.run_dir / 'report.html'} (and report.md)")
    pre = result.results.get("pretrain")
    if pre:
        first, last = pre.get("loss_first_epoch"), pre.get("loss_last_epoch")
        if first is not None and last is not None:
            drop = 100 * (first - last) / abs(first) if first else 0.0
            lines.append(f"  pretrain: {pre['epochs']} epochs, {pre['images_per_second']} img/s, "
                         f"loss {first:.4f} -> {last:.4f} ({drop:.1f}% lower)")
        for metric, label in MONITOR_METRICS.items():
            if pre.get(f"best_monitor_{metric}") is not None:
                lines.append(f"  best {label} during pretraining: {pre[f'best_monitor_{metric}']:.4f}")
        lines.append(f"  backbone: {pre['backbone']} (load with ssl_pipeline.load_backbone)")
    baselines = result.results.get("baselines", {})
    for stage in ("knn", "linear_probe", "few_shot", "finetune"):
        main = result.results.get(stage)
        if not main or main.get("top1") is None:
            continue
        refs = [f"{name} {b[stage]['top1']:.4f}" for name, b in baselines.items()
                if b.get(stage, {}).get("top1") is not None]
        lines.append(f"  {stage} test top-1: {main['top1']:.4f}" + (f" ({', '.join(refs)})" if refs else ""))
    return "\n".join(lines)

