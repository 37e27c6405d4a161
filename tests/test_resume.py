"""Resume: seeded resumable data order and views, checkpoints that survive a failed save or a
kill, and a run killed with SIGKILL that ends with the weights of one never interrupted."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ssl_pipeline
from ssl_pipeline.data.base import TransformedDataset
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.resume import ResumableSampler, drop_records_after, resume_checkpoint

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
# A 0.4M-parameter ResNet keeps the many checkpoints small.
EXACT = ["trainer.deterministic=true", "stages=[pretrain]", "backbone.name=timm:test_resnet"]


# ---------------------------------------------------------------------- the sampler


def shares(sampler: ResumableSampler, world: int, monkeypatch) -> list[list[int]]:
    out = []
    for rank in range(world):
        monkeypatch.setattr("ssl_pipeline.resume.process_group", lambda r=rank: (r, world))
        out.append([i for i, _ in sampler])
    return out


def test_processes_get_disjoint_equal_shares_of_one_seeded_order(monkeypatch):
    sampler = ResumableSampler(103, seed=7)
    sampler.set_epoch(2)
    first, second = shares(sampler, 2, monkeypatch)
    assert len(first) == len(second) == 51 == len(sampler)  # no padding, nothing counted twice
    assert not set(first) & set(second)
    monkeypatch.setattr("ssl_pipeline.resume.process_group", lambda: (0, 1))
    assert [i for i, _ in sampler] == sampler.order(2).tolist()  # same order, one process
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != sampler.order(2).tolist()


def test_resume_continues_the_epoch_part_way_then_starts_the_next_whole():
    sampler = ResumableSampler(40, seed=0)
    sampler.set_epoch(1)
    whole = list(sampler)
    sampler.resume(1, skip=16)
    assert len(sampler) == 40  # Lightning counts the batches of a whole epoch
    assert list(sampler) == whole[16:]
    sampler.set_epoch(1)  # Lightning sets the epoch again after a resume: the skip stays
    sampler.resume(1, skip=8)
    sampler.set_epoch(1)
    assert list(sampler) == whole[8:]
    assert list(sampler) == whole  # only the first pass after a resume is shortened


def test_views_depend_on_the_image_seed_not_on_the_process_stream():
    class Noise:
        def __call__(self, image):
            return image + torch.rand(3)

    base = [(torch.zeros(3), 0)] * 4
    data = TransformedDataset(base, Noise())
    torch.manual_seed(1)
    a = data[(2, 12345)][0]
    before = torch.random.get_rng_state()
    torch.manual_seed(99)
    assert torch.equal(a, data[(2, 12345)][0])
    assert not torch.equal(a, data[(2, 54321)][0])
    torch.manual_seed(1)
    data[(2, 12345)]
    assert torch.equal(torch.random.get_rng_state(), before)  # the stream itself is untouched


def test_a_batch_of_seeded_items_equals_them_one_by_one_and_unseeded_ones_draw_afresh():
    """`__getitems__` (the DataLoader's batched fetch) saves the process's generator states
    once per batch: the same views as one by one, the streams untouched; unseeded items still
    draw from the process's stream, so two batches of them differ."""
    class Noise:
        def __call__(self, image):
            return image + torch.rand(3) + float(np.random.rand()) + random.random()

    data = TransformedDataset([(torch.zeros(3), 0)] * 4, Noise())
    keys = [(i, 1000 + i) for i in range(4)]
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    states = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    batch = data.__getitems__(keys)
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]
    assert all(torch.equal(b[0], data[k][0]) for b, k in zip(batch, keys, strict=True))
    assert len({float(b[0][0]) for b in batch}) == 4  # each image its own draw
    first, second = data.__getitems__([0, 1]), data.__getitems__([0, 1])
    assert not torch.equal(first[0][0], second[0][0])
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=ResumableSampler(4, seed=3))
    assert torch.equal(torch.cat([x for x, _ in loader]),
                       torch.stack([data[k][0] for k in ResumableSampler(4, seed=3)]))


# ---------------------------------------------------------------------- checkpoints


def test_a_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    torch.save({"global_step": 3}, tmp_path / "previous.ckpt")
    torch.save({"global_step": 6}, tmp_path / "last.ckpt")
    assert resume_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # killed mid-write
    with pytest.warns(UserWarning, match="last.ckpt is damaged or incomplete.*previous.ckpt"):
        assert resume_checkpoint(tmp_path) == tmp_path / "previous.ckpt"
    (tmp_path / "previous.ckpt").write_bytes(b"")
    with pytest.raises(SSLPipelineError, match="no checkpoint .* reads back whole"):
        resume_checkpoint(tmp_path)
    assert resume_checkpoint(tmp_path / "none") is None


def test_drop_records_after_keeps_other_stages_and_earlier_steps(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"stage": "pretrain", "step": s, "train/loss": 1.0} for s in range(6)]
    lines.append({"stage": "knn", "step": 9, "top1": 0.5})
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"stage": "pretr')
    assert drop_records_after(metrics, "pretrain", 4) == 3  # steps 4, 5 and the torn line
    kept = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [(x["stage"], x["step"]) for x in kept] == [("pretrain", s) for s in range(4)] + [("knn", 9)]


def test_a_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    from lightning_fabric.plugins.io import torch_io

    saves = {"n": 0}
    real_save = torch_io._atomic_save

    def fill_disk(checkpoint, path):
        saves["n"] += Path(path).name == ".last.ckpt.tmp"
        if saves["n"] == 2:  # the second last.ckpt: half written, then the disk is full
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", fill_disk)
    out = tmp_path / "run"
    with pytest.raises(Exception, match="No space left"):
        ssl_pipeline.run(QUICKSTART, overrides=[*tiny_overrides, *EXACT], out_dir=out, quiet=True)
    ckpt_dir = out / "checkpoints"
    assert not (ckpt_dir / ".last.ckpt.tmp").exists()  # no temporary file left behind
    state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] == 3  # the first epoch's, intact
    assert resume_checkpoint(ckpt_dir) == ckpt_dir / "last.ckpt"


def test_a_crashed_run_resumes_mid_epoch_to_identical_weights(tmp_path, tiny_overrides, monkeypatch):
    """In-process: the run fails right after its step-4 checkpoint (mid-epoch 2)."""
    from ssl_pipeline.resume import TrainingCheckpoints

    overrides = [*tiny_overrides, *EXACT, "pretrain.epochs=3", "pretrain.checkpoint_every_n_steps=1"]
    whole = ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=tmp_path / "whole", quiet=True)

    save = TrainingCheckpoints.on_train_batch_end

    def crash_after_step_4(self, trainer, *args):
        save(self, trainer, *args)
        if trainer.global_step == 4:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(TrainingCheckpoints, "on_train_batch_end", crash_after_step_4)
    with pytest.raises(Exception, match="simulated crash"):
        ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=tmp_path / "cut", quiet=True)
    monkeypatch.setattr(TrainingCheckpoints, "on_train_batch_end", save)
    resumed = ssl_pipeline.run(resume=tmp_path / "cut", quiet=True)

    assert resumed.results["pretrain"]["resumed_from_step"] == 4
    assert resumed.results["pretrain"]["steps"] == whole.results["pretrain"]["steps"] == 9
    assert_same_weights(tmp_path / "whole", tmp_path / "cut")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "backbone.safetensors"), load_file(b / "backbone.safetensors")
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def step_records(run_dir: Path) -> list[tuple[int, str]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], k) for r in records if r.get("stage") == "pretrain"
            for k in r if k.startswith("train/")]


# ---------------------------------------------------------------------- SIGKILL, by the CLI


def cli_run(args: list[str], wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [str(Path(sys.executable).with_name("ssl-pipeline")), "run", *args]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
@pytest.mark.parametrize("method, workers, every, when", [
    ("simclr", 0, 1, "mid-epoch"),
    ("simsiam", 2, 2, "mid-epoch"),
    ("supervised", 0, None, "between epochs"),
])
def test_sigkill_and_resume_ends_with_the_weights_of_an_uninterrupted_run(
        tmp_path, tiny_overrides, method, workers, every, when):
    overrides = [*tiny_overrides, *EXACT, f"method.name={method}", f"data.num_workers={workers}",
                 "data.fake.train_samples=96", "pretrain.epochs=4"]
    if every:
        overrides.append(f"pretrain.checkpoint_every_n_steps={every}")
    whole = cli_run([str(QUICKSTART), "--quiet", "--out", str(tmp_path / "whole"), *sets(overrides)])
    assert whole.returncode == 0, whole.stdout + whole.stderr

    cut = tmp_path / "cut"
    proc = cli_run([str(QUICKSTART), "--out", str(cut), *sets(overrides)], wait=False)
    ckpt = cut / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    # mid-epoch: once step 8 (of 6 per epoch) is logged; between epochs: once epoch 1's
    # checkpoint exists (written after its last step).
    while time.time() < deadline and proc.poll() is None:
        if when == "mid-epoch" and any(s >= 8 for s, _ in _safe_records(cut)):
            break
        if when == "between epochs" and ckpt.exists():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    resumed = cli_run(["--resume", str(cut)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    step = json.loads((cut / "results.json").read_text())["pretrain"]["resumed_from_step"]
    assert step and step > 0
    assert f"resumed from step {step}" in resumed.stdout
    assert_same_weights(tmp_path / "whole", cut)
    records = step_records(cut)
    assert len(records) == len(set(records)), "metrics.jsonl repeats steps after the resume"
    # Every step the uninterrupted run logged is there, except perhaps the checkpointed step's
    # own line (logged just after the checkpoint is saved: a kill in between loses it).
    missing = set(step_records(tmp_path / "whole")) - set(records)
    assert {s for s, _ in missing} <= {step - 1}, sorted(missing)


@pytest.mark.slow
def test_sigkill_during_finetuning_and_resume_ends_as_an_uninterrupted_run(tmp_path, tiny_overrides):
    """Killed with SIGKILL after a fine-tuning epoch checkpoint, `--resume` goes on from that
    epoch and the run's result is the uninterrupted one's (validation history and test top-1)."""
    overrides = [*tiny_overrides, "trainer.deterministic=true", "backbone.name=timm:test_resnet",
                 "stages=[pretrain, finetune]", "pretrain.epochs=1", "eval.finetune.epochs=30",
                 "eval.finetune.label_fractions=[1.0]", "eval.finetune.backbone_lr_ratio=0.1",
                 "eval.baselines=[]", "eval.checkpoint_minutes=0"]
    whole = cli_run([str(QUICKSTART), "--quiet", "--out", str(tmp_path / "whole"), *sets(overrides)])
    assert whole.returncode == 0, whole.stdout + whole.stderr

    cut = tmp_path / "cut"
    proc = cli_run([str(QUICKSTART), "--out", str(cut), *sets(overrides)], wait=False)
    ckpt = cut / "runs/finetune/backbone/1.0/seed0.partial/setting0.ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not ckpt.exists():
        time.sleep(0.02)
    time.sleep(0.5)  # a few epochs more: the kill lands mid-run, after the first checkpoint
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    resumed = cli_run(["--resume", str(cut)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    said = re.search(r"finetune/backbone/1.0/seed0: resumed after epoch (\d+) of 30", resumed.stdout)
    assert said and 1 <= int(said.group(1)) < 30, resumed.stdout  # mid-run, not over
    runs = [json.loads((d / "results.json").read_text())["finetune"]["by_fraction"]["1.0"]["by_seed"][0]
            for d in (tmp_path / "whole", cut)]
    for key in ("val_top1_by_epoch", "best_epoch", "top1", "epochs_run"):
        assert runs[0][key] == runs[1][key], key
    assert not ckpt.parent.exists()


def _safe_records(run_dir: Path) -> list[tuple[int, str]]:
    try:
        return step_records(run_dir)
    except (OSError, json.JSONDecodeError):
        return []


@pytest.mark.slow
def test_slurm_requeue_signal_saves_a_checkpoint_requeues_and_the_job_resumes(tmp_path, tiny_overrides):
    """SIGUSR1 to a training under (simulated) srun: Lightning saves hpc_ckpt_1.ckpt and calls
    `scontrol requeue JOB`; SLURM then kills the job and the requeued one resumes from it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ssl-pretrain", "SLURM_NTASKS": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    overrides = [*tiny_overrides, *EXACT, "trainer.slurm_requeue=true", "pretrain.epochs=6"]
    run_dir = tmp_path / "run"
    exe = str(Path(sys.executable).with_name("ssl-pipeline"))
    proc = subprocess.Popen([exe, "run", str(QUICKSTART), "--out", str(run_dir), *sets(overrides)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not any(s >= 4 for s, _ in _safe_records(run_dir)):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    os.kill(proc.pid, signal.SIGUSR1)
    while time.time() < deadline and proc.poll() is None and not calls.exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # what SLURM does to the requeued job
    proc.wait()
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = list(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1

    resumed = subprocess.run([exe, "run", "--resume", str(run_dir)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    step = json.loads((run_dir / "results.json").read_text())["pretrain"]["resumed_from_step"]
    assert step >= 4
