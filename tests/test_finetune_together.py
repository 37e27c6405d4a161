"""Fine-tuning with every process of a process group (DDP over gloo on CPU, 2 processes):
the same steps as one process taking the whole batch, one time budget for all, a resume."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import free_port
from torch import nn

from ssl_pipeline.evals.finetune import (
    FinetuneSettings,
    fit_finetuner,
    seeded_train_loader,
)
from ssl_pipeline.evals.together import FitGroup, FitOrder

pytestmark = pytest.mark.slow  # distributed: 2 processes each

IMAGES, BATCH, CLASSES = 64, 16, 3


class Tiny(nn.Module):
    """No BatchNorm: each process normalizing its share would make the runs differ."""
    feature_dim = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16))

    def forward(self, x):
        return self.net(x)


def data() -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(IMAGES, 3, 2, 2, generator=g)
    return [(x[i] + (i % CLASSES), i % CLASSES) for i in range(IMAGES)]


def noisy(x: torch.Tensor) -> torch.Tensor:  # an augmentation: each image's draw from its seed
    return x + 0.3 * torch.randn_like(x)


def kwargs() -> dict:
    return {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "enable_checkpointing": False}


def settings(max_minutes: float | None = None, epochs: int = 3) -> FinetuneSettings:
    return FinetuneSettings(epochs=epochs, lr=0.01, backbone_lr_ratio=0.5, max_minutes=max_minutes)


class LoggedLoss(pl.Callback):
    """The training loss each step logged, as metrics.jsonl and W&B receive it."""

    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(trainer.callback_metrics["finetune/loss_step"].item())


def fit(s: FinetuneSettings, shard: bool = False, validate: bool = True,
        logged: LoggedLoss | None = None, **together) -> tuple[nn.Module, dict]:
    torch.manual_seed(1)
    train = seeded_train_loader(data(), noisy, BATCH, seed=5, shard=shard)
    val = torch.utils.data.DataLoader(data(), batch_size=32) if validate else None
    trainer_kwargs = {**kwargs(), "callbacks": [logged] if logged is not None else []}
    return fit_finetuner(Tiny(), CLASSES, train, val, s, trainer_kwargs, **together)


def _together(rank: int, port: int, max_minutes, checkpoint: str | None, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        group = FitGroup()
        s = settings(max_minutes)
        logged = LoggedLoss()
        if rank == 0:
            path = None if checkpoint is None else Path(checkpoint)
            model, result = fit(s, shard=True, logged=logged, together=group,
                                order=FitOrder("backbone", 1.0, 0, False, 0), checkpoint=path)
            group.send(None)
        else:
            order = group.receive()
            resume = None
            if order.checkpoint is not None:
                resume = Path(checkpoint).with_suffix(".sent")
                resume.write_bytes(order.checkpoint)
            model, result = fit(s, shard=True, validate=False, logged=logged, together=group,
                                resume_from=resume)
            assert group.receive() is None
        result.pop("this_call")
        result["logged_loss"] = logged.values
        out[rank] = ({k: v.clone() for k, v in model.state_dict().items()}, result, len(
            seeded_train_loader(data(), noisy, BATCH, seed=5, shard=True)))
    finally:
        dist.destroy_process_group()


def run_together(max_minutes=None, checkpoint: Path | None = None) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        context = mp.spawn(_together, args=(free_port(), max_minutes, checkpoint and str(checkpoint), out),
                           nprocs=2, join=False)
        deadline = time.time() + 240
        while not context.join(timeout=5):
            if time.time() > deadline:  # a process waiting for the other forever
                for p in context.processes:
                    p.kill()
                pytest.fail("the two processes did not finish together")
        return dict(out)


def test_two_processes_take_the_steps_one_process_takes_with_the_whole_batch():
    together = run_together()
    single_loss = LoggedLoss()
    single, single_fit = fit(settings(), logged=single_loss)
    state, result, steps = together[0]
    # the loss logged is the whole batch's, the same on both processes, not each one's share
    assert len(single_loss.values) == 3 * IMAGES // BATCH
    assert result["logged_loss"] == pytest.approx(single_loss.values, abs=1e-5)
    assert together[1][1]["logged_loss"] == pytest.approx(single_loss.values, abs=1e-5)
    assert steps == IMAGES // BATCH  # each process: 4 steps of 8 per epoch, as one process of 16
    assert result["epochs_run"] == 3 == together[1][1]["epochs_run"]
    assert result["val_top1_by_epoch"] == pytest.approx(single_fit["val_top1_by_epoch"], abs=1e-6)
    assert result["best_epoch"] == single_fit["best_epoch"]
    for k, v in single.state_dict().items():
        assert torch.allclose(state[k], v, atol=1e-5), k
    assert together[1][1]["val_top1_by_epoch"] == []  # rank 0 alone validates
    untrained = Tiny().state_dict()
    assert not torch.allclose(state["backbone.net.1.weight"], untrained["net.1.weight"])


def test_rank_0s_time_budget_stops_every_process_after_the_same_step():
    together = run_together(max_minutes=1e-5)  # out of time at the first step
    # both stop in the first epoch (counted as run), the other too though it has no budget of
    # its own: going on alone, it would wait for rank 0 forever
    assert together[0][1]["stopped_by_budget"] and together[0][1]["epochs_run"] == 1
    assert together[1][1]["stopped_by_budget"] and together[1][1]["epochs_run"] == 1


class Crash(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:  # after the checkpoint of epoch 2's end
            raise RuntimeError("killed")


def test_the_others_resume_from_the_checkpoint_rank_0_sends(tmp_path):
    checkpoint = tmp_path / "setting0.ckpt"
    torch.manual_seed(1)  # one process trains 2 of the 3 epochs, saving each
    with pytest.raises(RuntimeError, match="killed"):
        fit_finetuner(Tiny(), CLASSES, seeded_train_loader(data(), noisy, BATCH, seed=5),
                      torch.utils.data.DataLoader(data(), batch_size=32), settings(),
                      {**kwargs(), "callbacks": [Crash()]}, checkpoint=checkpoint)
    together = run_together(checkpoint=checkpoint)  # 2 processes finish the run from it
    assert together[0][1]["epochs_run"] == 3 and together[1][1]["epochs_run"] == 3
    single, single_fit = fit(settings())  # uninterrupted, one process
    assert together[0][1]["val_top1_by_epoch"] == pytest.approx(single_fit["val_top1_by_epoch"], abs=1e-6)
    for k, v in single.state_dict().items():  # rank 0: the best epoch's weights
        assert torch.allclose(together[0][0][k], v, atol=1e-5), k
    # the other process (no validation: its last weights) resumed the optimizer's state too
    single_last, _ = fit(settings(), validate=False)
    for k, v in single_last.state_dict().items():
        assert torch.allclose(together[1][0][k], v, atol=1e-5), k


def _fails_mid_fit(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group = FitGroup()
    if rank == 0:
        torch.manual_seed(1)
        fit_finetuner(Tiny(), CLASSES, seeded_train_loader(data(), noisy, BATCH, seed=5, shard=True),
                      None, settings(), {**kwargs(), "callbacks": [Crash()]}, together=group,
                      order=FitOrder("backbone", 1.0, 0, False, 0))
    else:
        group.receive()
        fit(settings(), shard=True, validate=False, together=group)


def test_when_rank_0_fails_mid_fit_the_other_process_ends_within_seconds():
    """Not after the process group's 30-minute timeout: it fails as rank 0's connections close."""
    spawn = mp.get_context("spawn")
    processes = [spawn.Process(target=_fails_mid_fit, args=(rank, port))
                 for port in [free_port()] for rank in range(2)]
    for p in processes:
        p.start()
    processes[0].join(timeout=240)
    ended = time.time()
    processes[1].join(timeout=60)
    alive = processes[1].exitcode is None
    for p in processes:
        p.kill()
    assert processes[0].exitcode == 1  # the injected failure
    assert not alive and processes[1].exitcode != 0, "the other process kept waiting"
    assert time.time() - ended < 30


def test_a_run_resumed_after_its_budget_ran_out_trains_no_further_step(tmp_path):
    checkpoint = tmp_path / "setting0.ckpt"
    torch.manual_seed(1)  # one process: its budget ends it in the first epoch, saved at the end
    _, first = fit_finetuner(Tiny(), CLASSES, seeded_train_loader(data(), noisy, BATCH, seed=5),
                             torch.utils.data.DataLoader(data(), batch_size=32), settings(1e-5),
                             kwargs(), checkpoint=checkpoint)
    assert first["stopped_by_budget"] and first["epochs_run"] == 1
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    together = run_together(max_minutes=1e-5, checkpoint=checkpoint)
    assert together[0][1]["stopped_by_budget"] and together[1][1]["stopped_by_budget"]
    assert together[0][1]["epochs_run"] == 1 == together[1][1]["epochs_run"]
    for k, v in saved.items():  # the other process: rank 0's resumed weights, no step taken
        assert torch.equal(together[1][0][k], v), k
