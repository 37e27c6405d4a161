"""Pretraining that can be killed at any moment and continued as if it never stopped.

Three things make a resumed run end with the same weights as an uninterrupted one (on CPU with
`trainer.deterministic: true`):

- `ResumableSampler` draws each epoch's order from `(seed, epoch)` alone, shards it over the
  processes itself (no padding: every process gets `size // world` images, as with
  `drop_last`), and can start an epoch part-way through, at the batch a checkpoint recorded.
- Every training image carries its own seed, `(seed, epoch, index)`, and `TransformedDataset`
  draws that image's augmentation from it: the views do not depend on which worker made them,
  how many workers there are, or where the run was restarted.
- `TrainingCheckpoints` saves `last.ckpt` every N optimizer steps and at every epoch end,
  holding, besides Lightning's model, optimizer, scheduler and loop state, the sampler position
  and every process's random-number-generator states (they drive the device-side views).

Checkpoints are written to a temporary file and renamed into place; the one before is kept as
`previous.ckpt`, so a failed save (disk full) or a file cut short by a kill leaves a good one,
and `resume_checkpoint` picks the newest checkpoint that reads back whole.
"""

from __future__ import annotations

import json
import os
import random
import warnings
import zipfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist

from ssl_pipeline.atomic import write_text_atomic
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.features import process_group

LAST, PREVIOUS = "last.ckpt", "previous.ckpt"

# Our sampler restores its position through TrainingCheckpoints, which Lightning cannot see.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
# A resumed run writes into its own checkpoints/ folder again, as it should.
warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")


def sample_seed(seed: int, epoch: int, index: int | None = None) -> int:
    """The seed of one image's augmentation in one epoch; without `index`, of the epoch's order.

    >>> len({sample_seed(0, 0, 5), sample_seed(0, 1, 5), sample_seed(1, 0, 5), sample_seed(0, 0)})
    4
    """
    entropy = [seed, epoch, 0 if index is None else index + 1]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


class ResumableSampler(torch.utils.data.Sampler):
    """Yields `(index, seed)` pairs: this process's share of the epoch's seeded order.

    The rank and world size are read when iterating (the process group exists by then), so one
    sampler serves a single process and every DDP process alike. `resume(epoch, skip)` makes
    the next iteration start `skip` images into that epoch's share.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, shard: bool = True):
        if size < 1:
            raise SSLPipelineError("the training split is empty: nothing to pretrain on")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.shard = shard  # False: the whole epoch for this process, in a process group too
        self.epoch = 0
        self.skip = 0

    def __len__(self) -> int:
        return self.size // self._rank_and_world()[1]  # a full epoch, also when resuming part-way

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def resume(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=generator)

    def _rank_and_world(self) -> tuple[int, int]:
        return process_group() if self.shard else (0, 1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = self._rank_and_world()
        epoch, skip = self.epoch, self.skip
        self.skip = 0  # only the first iteration after a resume starts part-way
        share = self.order(epoch)[: (self.size // world) * world][rank::world]
        for index in share[skip:].tolist():
            yield index, sample_seed(self.seed, epoch, index)


def rng_states() -> dict[str, Any]:
    """This process's generator states, as tensors and plain values (checkpoints stay loadable
    with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
              "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class TrainingCheckpoints(pl.Callback):
    """`last.ckpt` every `every_n_steps` optimizer steps (when set) and at every epoch end; the
    one it replaces becomes `previous.ckpt`. Also seeds each process (`seed + global rank`)
    and, after a resume, puts back the random-number-generator states the checkpoint holds."""

    def __init__(self, directory: Path, sampler: ResumableSampler, seed: int,
                 every_n_steps: int | None = None, per_device_batch: int = 1,
                 metrics: Path | None = None, quiet: bool = False):
        self.directory = Path(directory)
        self.metrics = metrics
        self.quiet = quiet
        self.sampler = sampler
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.per_device_batch = per_device_batch
        self._position = {"epoch": 0, "batch": 0, "global_step": 0}
        self._saving = False  # True while our own save runs; else Lightning's (SLURM requeue)
        self._trainer: pl.Trainer | None = None
        self._restored_rng: list[dict[str, Any]] | None = None
        self.resumed_from: dict[str, int] | None = None

    # ------------------------------------------------------------------ saving

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every_n_steps or trainer.global_step % self.every_n_steps:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch-end checkpoint follows at once
        self._position = {"epoch": trainer.current_epoch, "batch": batch_idx + 1,
                          "global_step": trainer.global_step}
        self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._position = {"epoch": trainer.current_epoch + 1, "batch": 0,
                          "global_step": trainer.global_step}
        self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Write to a temporary file, keep the current last.ckpt as previous.ckpt, rename."""
        last, tmp = self.directory / LAST, self.directory / f".{LAST}.tmp"
        try:
            self._saving = True
            trainer.save_checkpoint(tmp)  # every rank takes part; rank 0 writes
            if trainer.is_global_zero:
                if last.exists():
                    os.replace(last, self.directory / PREVIOUS)
                os.replace(tmp, last)
        finally:
            self._saving = False
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
        trainer.strategy.barrier("training_checkpoint")

    def state_dict(self) -> dict[str, Any]:
        # Called on every process while the checkpoint is assembled: gather all their RNG states.
        states = rng_states()
        _, world = process_group()
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, states)
        else:
            gathered = [states]
        return {"position": self._live_position(), "rng": gathered,
                "per_device_batch": self.per_device_batch}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _live_position(self) -> dict[str, int]:
        """Where training is: ours as recorded at the save; for a checkpoint Lightning saves by
        itself (SLURM's SIGUSR1 handler, at any moment), the batches completed so far. A signal
        that lands inside a step can make the resumed run redo that one step."""
        if self._saving or self._trainer is None:
            return dict(self._position)
        t = self._trainer
        return {"epoch": t.current_epoch, "global_step": t.global_step,
                "batch": t.fit_loop.epoch_loop.batch_progress.current.completed}

    # ------------------------------------------------------------------ resuming

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = state["position"]
        if state.get("per_device_batch", self.per_device_batch) != self.per_device_batch:
            raise SSLPipelineError(
                f"the checkpoint was written with {state['per_device_batch']} images per device "
                f"per step, this run has {self.per_device_batch}; resume with the same "
                "pretrain.batch_size, trainer.devices and trainer.num_nodes"
            )
        self.sampler.resume(position["epoch"], position["batch"] * self.per_device_batch)
        self._restored_rng = state["rng"]
        self.resumed_from = dict(position)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Each process draws its own device-side augmentations: seed + global rank.
        pl.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)
        if self._restored_rng is None:
            return
        rank = trainer.global_rank
        if rank < len(self._restored_rng):
            set_rng_states(self._restored_rng[rank])
        self._restored_rng = None
        if trainer.is_global_zero and self.resumed_from:
            step = self.resumed_from.get("global_step", 0)
            dropped = drop_records_after(self.metrics, "pretrain", step) if self.metrics else 0
            if not self.quiet:
                at = self.resumed_from
                print(f"pretrain: resumed from step {step} (epoch {at['epoch']}, batch {at['batch']})"
                      + (f"; {dropped} records logged after that checkpoint dropped from "
                         f"{self.metrics.name}" if dropped else ""), flush=True)


def reads_back_whole(path: Path) -> bool:
    """A torch checkpoint is a zip archive: a cut-short or damaged one fails its CRC check."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def resume_checkpoint(directory: Path, run_dir: Path | None = None) -> Path | None:
    """The newest checkpoint in `directory` that reads back whole (last.ckpt, else
    previous.ckpt, with a warning), or None when there is none to resume from. A newer
    `hpc_ckpt_*.ckpt` in `run_dir` (Lightning's, saved on SLURM's requeue signal) goes first."""
    found = [Path(directory) / name for name in (LAST, PREVIOUS) if (Path(directory) / name).exists()]
    if run_dir is not None:
        hpc = sorted(Path(run_dir).glob("hpc_ckpt_*.ckpt"), key=lambda p: p.stat().st_mtime)
        if hpc and (not found or hpc[-1].stat().st_mtime > found[0].stat().st_mtime):
            found.insert(0, hpc[-1])
    for i, path in enumerate(found):
        if reads_back_whole(path):
            if i:
                warnings.warn(f"{found[0]} is damaged or incomplete (a save cut short?); "
                              f"resuming from {path} instead", stacklevel=2)
            return path
    if found:
        raise SSLPipelineError(
            f"no checkpoint in {directory} reads back whole ({', '.join(p.name for p in found)}); "
            "move them aside to start pretraining over, or restore one from a backup"
        )
    return None


def drop_records_after(metrics: Path, stage: str, step: int) -> int:
    """Remove `stage`'s records at `step` or later from metrics.jsonl (steps a killed run
    logged after its last checkpoint; the resumed run logs them again). Returns how many."""
    if not metrics.exists():
        return 0
    kept, dropped = [], 0
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            dropped += 1
            continue
        if record.get("stage") == stage and isinstance(record.get("step"), int) and record["step"] >= step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        write_text_atomic(metrics, "".join(line + "\n" for line in kept))
    return dropped
