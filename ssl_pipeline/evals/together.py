"""Fine-tuning with every process of a process group (after DDP pretraining).

Rank 0 drives the evaluation stages as one process would: it decides which runs to train
(kept results, reused baselines), validates, saves checkpoints, tests and writes. At each
fine-tuning (or classic-probe) fit it sends the other processes a `FitOrder` (which subject,
label fraction, seed and grid setting, and the checkpoint it resumes from) over a gloo group
whose timeout outlasts the stages rank 0 runs alone (k-NN, probes); then every process trains
on its share of each batch and `AverageGradients` averages the gradients after each backward
pass: the same steps as one process taking the whole batch (BatchNorm aside: each process
normalizes its share, as under DDP). The others then wait for the next order, or for None.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pytorch_lightning as pl
import torch
import torch.distributed as dist

# The others wait for rank 0's next order while it runs k-NN and the probes alone: hours at
# ImageNet scale on a CPU, far beyond the process group's default 30 minutes.
ORDER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class FitOrder:
    """One fit for the other processes to train their share of (see `evaluation.train_share`)."""
    subject: str  # the name under which share_features sent its backbone
    fraction: float
    seed: int
    classic: bool
    setting: int  # index into the run's grid of (lr, backbone_lr_ratio) pairs
    checkpoint: bytes | None = None  # the state rank 0 resumes from, read from its run directory


class FitGroup:
    """Orders from rank 0 to the other processes of the default process group."""

    def __init__(self):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("FitGroup needs an initialized process group")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # every process creates it, in the same order: a collective call
        self.group = dist.new_group(backend="gloo", timeout=ORDER_TIMEOUT)

    def send(self, order: FitOrder | None) -> None:
        """Rank 0: the next fit, or None when there are no more."""
        dist.broadcast_object_list([order], src=0, group=self.group)

    def receive(self) -> FitOrder | None:
        box: list[FitOrder | None] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class AverageGradients(pl.Callback):
    """Data-parallel training in processes that each run their own single-device Trainer:
    rank 0's weights and buffers go to every process when training starts, and after every
    backward pass the gradients are averaged over the processes in one all-reduce. That
    all-reduce also carries rank 0's time budget: when `elapsed()` reaches `budget_seconds`
    every process stops after the same step (each checking its own clock could leave one
    waiting for the others forever)."""

    def __init__(self, budget_seconds: float | None = None,
                 elapsed: Callable[[], float] | None = None):
        self.budget_seconds = budget_seconds
        self.elapsed = elapsed
        self.stopped = False  # the budget ended training
        self._started = time.time()

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.time()
        device = next(pl_module.parameters()).device
        with torch.no_grad():
            for tensor in [*pl_module.parameters(), *pl_module.buffers()]:
                dist.broadcast(tensor.data, src=0)
            # a run resumed after its budget ran out trains no further step (a new run takes
            # at least one, as with Lightning's max_time)
            resumed = trainer.current_epoch > 0 or trainer.global_step > 0
            spent = torch.tensor([float(resumed and self.out_of_time())], device=device)
            dist.broadcast(spent, src=0)
        if spent.item() > 0:
            trainer.should_stop = True
            self.stopped = True

    def out_of_time(self) -> bool:
        return self.budget_seconds is not None and self.seconds() >= self.budget_seconds

    def seconds(self) -> float:
        return self.elapsed() if self.elapsed is not None else time.time() - self._started

    def on_after_backward(self, trainer, pl_module) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if not params:
            return
        flag = torch.tensor([float(self.out_of_time())], device=params[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params] + [flag])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        if flat[-1].item() > 0:
            trainer.should_stop = True
            self.stopped = True


def fit_devices(accelerator: str) -> int | list[int]:
    """The Trainer's `devices` for one process's fit: its own GPU (the one DDP pretraining
    set for it), else one CPU process."""
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return [torch.cuda.current_device()]
    return 1
