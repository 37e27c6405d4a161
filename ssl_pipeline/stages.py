"""The stage registry and what every stage receives: the run context."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from ssl_pipeline.atomic import write_text_atomic
from ssl_pipeline.recipe import Recipe
from ssl_pipeline.registry import Registry

# name -> stage function (RunContext) -> dict of results for results.json
stage_registry: Registry[Callable[["RunContext"], dict[str, Any]]] = Registry("stage")


def is_global_zero() -> bool:
    """True in the process that owns the run directory (rank 0 of a distributed run)."""
    return all(int(os.environ.get(var, "0")) == 0
               for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def launched_processes() -> int:
    """Processes started by an outside launcher (torchrun, srun), each running the command."""
    return max(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("SLURM_NTASKS", "1")))


def run_name(run_dir: Path) -> str:
    """`<recipe name>/<timestamp>`: the run directory's last two parts, W&B's run group."""
    return f"{run_dir.parent.name}/{run_dir.name}"


@dataclass
class Resolved:
    """Values derived from the recipe and the machine, recorded in the run's recipe.yaml."""

    accelerator: str
    devices: int
    world_size: int
    per_device_batch_size: int
    effective_lr: float
    data: dict[str, Any] = field(default_factory=dict)
    views: dict[str, Any] = field(default_factory=dict)
    precision: str = "32"  # trainer.precision, with "auto" made concrete for the accelerator


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    resolved: Resolved
    quiet: bool = False
    resuming: bool = False
    # Results of the baselines, {name: {stage: result}}, filed under results["baselines"].
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Objects shared by the stages of one run (loaded backbone, features in memory).
    cache: dict[str, Any] = field(default_factory=dict)
    # Images the current stage pushed through a network and the seconds that took, for the
    # report's images per second; reset by the pipeline at the start of every stage.
    throughput: dict[str, float] = field(default_factory=lambda: {"images": 0, "seconds": 0.0})

    def count_images(self, images: int, seconds: float) -> None:
        self.throughput["images"] += images
        self.throughput["seconds"] += seconds

    @cached_property
    def data(self):
        from ssl_pipeline.data import build_dataset, files_size_for_backbone

        return files_size_for_backbone(build_dataset(self.recipe.data), self.recipe.backbone)

    @cached_property
    def tracker(self):
        """W&B for this pipeline run (one W&B run per stage, in one group); rank 0 only."""
        from ssl_pipeline.tracking import WandbTracker

        return WandbTracker(self.recipe.tracking.wandb, self.run_dir, run_name(self.run_dir),
                            self.recipe.model_dump(mode="json"), quiet=self.quiet,
                            active=is_global_zero())

    @property
    def state_path(self) -> Path:
        return self.run_dir / "run_state.json"

    def stage_state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {}
        return json.loads(self.state_path.read_text()).get("stages", {})

    def mark_stage(self, stage: str, **info: Any) -> None:
        if not is_global_zero():
            return
        stages = self.stage_state()
        stages[stage] = info
        write_text_atomic(self.state_path, json.dumps({"stages": stages}, indent=2))
