"""DDP over gloo on CPU, 2 processes: NT-Xent with gathered negatives, and the CLI end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from ssl_pipeline.backbones import remove_batchnorm
from ssl_pipeline.methods import OptimSettings
from ssl_pipeline.methods.simclr import SimCLR

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


class TinyBackbone(nn.Module):
    feature_dim = 16

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16))

    def forward(self, x):
        return self.net(x)


def simclr_without_batchnorm() -> SimCLR:
    torch.manual_seed(0)
    method = SimCLR(TinyBackbone(), OptimSettings(), hidden_dim=32, output_dim=8, temperature=0.2)
    remove_batchnorm(method.projection_head, "the projection head")  # per-process BN would differ
    return method


def views(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 2, 2, generator=g), torch.randn(batch, 3, 2, 2, generator=g)


def loss_and_grads(method: SimCLR, x0: torch.Tensor, x1: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    loss, _ = method.training_loss([(x0, x1), None])
    loss.backward()
    return loss.item(), [p.grad.clone() for p in method.parameters()]


def _ddp_worker(rank: int, world: int, port: int, batch: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        method = simclr_without_batchnorm()
        x0, x1 = views(world * batch)
        share = slice(rank * batch, (rank + 1) * batch)
        loss, grads = loss_and_grads(method, x0[share], x1[share])
        for g in grads:  # what DDP does to gradients: the mean over processes
            dist.all_reduce(g)
            g /= world
        out[rank] = (loss, grads)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ntxent_with_gathered_negatives_on_2_processes_equals_1_process_with_twice_the_batch():
    batch = 6
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, free_port(), batch, out), nprocs=2, join=True)
        results = dict(out)
    single_loss, single_grads = loss_and_grads(simclr_without_batchnorm(), *views(2 * batch))
    # Each process's loss covers its own positives against all 2 x 2b negatives; their mean is
    # the loss of the whole batch, and the DDP-averaged gradients are its gradients.
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(single_loss, rel=1e-6)
    assert results[0][0] != pytest.approx(results[1][0])  # the processes saw different data
    for ddp, single in zip(results[0][1], single_grads):
        assert torch.allclose(ddp, single, atol=1e-6, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)  # every process steps with the same gradients


# ---------------------------------------------------------------------- features under DDP


class Numbered(torch.utils.data.Dataset):
    """Item i is the features (i, -i) with label i % 3: where a row lands shows which item."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i), -float(i)]), i % 3


def _extract_worker(rank: int, world: int, port: int, sizes: list, cache: str, out: dict) -> None:
    from ssl_pipeline import features

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        features.GATHER_ROWS = 2  # several gather rounds even on tiny data
        real = features.extract_features
        for n in sizes:
            calls = []

            def counting(backbone, loader, *args):
                calls.append(len(loader.dataset))
                return real(backbone, loader, *args)

            features.extract_features = counting
            loader = torch.utils.data.DataLoader(Numbered(n), batch_size=4)
            first = features.cached_features(nn.Identity(), loader, Path(cache), f"n{n}",
                                             together=True)
            second = features.cached_features(nn.Identity(), loader, Path(cache), f"n{n}",
                                             together=True)
            out[(rank, n)] = (first, second[2], calls)
    finally:
        dist.destroy_process_group()


def test_sharded_feature_extraction_counts_every_sample_once_in_dataset_order(tmp_path):
    sizes = [13, 8, 1]  # uneven shards, even ones, an empty shard
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_extract_worker, args=(2, free_port(), sizes, str(tmp_path), out), nprocs=2,
                 join=True)
        results = dict(out)
    for n in sizes:
        (x, y, hit), second_hit, calls = results[(0, n)]
        assert x.tolist() == [[float(i), -float(i)] for i in range(n)]  # none missing or twice
        assert y.tolist() == [i % 3 for i in range(n)] and not hit
        assert calls == [(n + 1) // 2]  # rank 0 extracted only its shard ...
        assert results[(1, n)][2] == ([n // 2] if n // 2 else [])  # ... and rank 1 the rest
        assert results[(1, n)][0] == (None, None, False)  # rank 0 holds the features
        assert second_hit and results[(1, n)][1]  # rank 0 found the cache: so did rank 1
        with np.load(tmp_path / f"n{n}.npz") as saved:
            assert np.array_equal(saved["features"], x)


# ---------------------------------------------------------------------- the CLI under DDP

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.precision=32",
       "data.name=fake", "data.image_size=16", "backbone.stem=default", "data.fake.train_samples=64",
       "data.fake.val_samples=16", "data.fake.test_samples=16", "pretrain.epochs=2",
       "pretrain.batch_size=16", "pretrain.monitor_every_n_epochs=1", "trainer.log_every_n_steps=1",
       "eval.seeds=1", "eval.linear_probe.epochs=5", "tracking.wandb.mode=disabled",
       "stages=[pretrain,knn,linear_probe]"]


CANARY = "canary-0123456789abcdef0123456789abcdef01234567"  # a W&B API key that must not leak


def cli(args: list[str], cwd: Path, wandb: str = "disabled") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": wandb, "WANDB_API_KEY": CANARY}
    env.pop("SSL_PIPELINE_RUN_DIR", None)
    exe = Path(sys.executable).with_name("ssl-pipeline")
    return subprocess.run([str(exe), "run", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=1200, check=False)


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "simsiam", "supervised"])
def test_two_process_ddp_runs_pretraining_and_evaluation_end_to_end(tmp_path, method):
    overrides = [*DDP, f"method.name={method}", f"eval.cache_dir={tmp_path / 'cache'}"]
    wandb = "offline" if method == "simclr" else "disabled"  # W&B under DDP: rank 0 logs
    done = cli([str(QUICKSTART), *sets(overrides)], cwd=tmp_path, wandb=wandb)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = list((tmp_path / "reports").glob("*/*"))
    assert len(runs) == 1, f"rank 0 chooses one run directory for both processes: {runs}"
    run_dir = runs[0]
    results = json.loads((run_dir / "results.json").read_text())
    # 64 images over 2 processes x 8 per step: 4 steps per epoch, each on a distinct half.
    assert results["pretrain"]["steps"] == 8 and results["pretrain"]["epochs"] == 2
    assert results["knn"]["top1"] is not None and results["linear_probe"]["top1"] is not None
    assert json.loads((run_dir / "run_state.json").read_text())["stages"]["knn"]["status"] == "done"
    assert done.stdout.count("done in") == 1  # only rank 0 reports
    assert done.stdout.count("stage knn: running") == 1  # evaluation after training runs once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "reports"]  # nothing stray
    written = (run_dir / "recipe.yaml").read_text()
    assert "world_size: 2" in written and "per_device_batch_size: 8" in written
    assert "features: 2 processes extract each split together" in done.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")) \
        == ["best.ckpt", "last.ckpt", "previous.ckpt"]
    assert CANARY not in done.stdout + done.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    if wandb == "offline":
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) >= 3  # pretrain, knn, probe
    assert_features_as_one_process_extracts_them(run_dir, tmp_path / "cache")

    if method == "simclr":  # each process seeded distinctly, and reproducibly: a rerun matches
        again = cli([str(QUICKSTART), "--out", str(tmp_path / "again"), *sets(overrides)], cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        first, second = load_file(run_dir / "backbone.safetensors"), load_file(
            tmp_path / "again" / "backbone.safetensors")
        assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_every_process_finetunes_together_after_ddp_pretraining(tmp_path):
    """After DDP pretraining both processes train each fine-tuning run (and the classic probe),
    each on its half of every batch of 16: 4 steps per epoch over all 64 images; rank 0 alone
    validates, saves and writes (the resume from rank 0's checkpoint: test_finetune_together)."""
    overrides = [*DDP, "stages=[pretrain,knn,finetune,linear_probe_classic]", "eval.baselines=[]",
                 "eval.finetune_processes=all",
                 "eval.finetune.epochs=2", "eval.finetune.batch_size=16",
                 "eval.finetune.label_fractions=[0.5, 1.0]", "eval.finetune.lr=[0.01, 0.001]",
                 "eval.finetune.backbone_lr_ratio=0.1", "eval.checkpoint_minutes=0",
                 "eval.linear_probe_classic.epochs=2", "eval.linear_probe_classic.batch_size=16",
                 f"eval.cache_dir={tmp_path / 'cache'}"]
    done = cli([str(QUICKSTART), "--out", str(tmp_path / "run"), *sets(overrides)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("2 processes train each run together") == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    run = results["finetune"]["by_fraction"]["1.0"]["by_seed"][0]
    assert run["train_samples"] == 64 and run["epochs_run"] == 2
    assert run["processes"] == 2 and run["batch_size"] == 16 and len(run["grid"]) == 2
    half = results["finetune"]["by_fraction"]["0.5"]["by_seed"][0]
    assert half["train_samples"] == 32 and half["processes"] == 2
    probe = results["linear_probe_classic"]["by_seed"][0]
    assert probe["processes"] == 2 and probe["epochs_run"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [r for r in records
             if r.get("stage") == "finetune/backbone/1.0/seed0/lr0.01_ratio0.1" and "finetune/loss_step" in r]
    assert len(steps) == 2 * 64 // 16  # 4 steps of 16 (8 per process) per epoch: every image once
    assert not (tmp_path / "run" / "runs/finetune/backbone/1.0/seed0.partial").exists()
    assert results["knn"]["top1"] is not None  # rank 0's solo stage before, with the others waiting


@pytest.mark.slow
def test_on_cpus_rank_0_finetunes_alone_on_every_image_by_default(tmp_path):
    """`eval.finetune_processes: auto` on CPU processes: rank 0 trains each run alone (the
    process group still up), its loader taking every training image, not its DDP half."""
    overrides = [*DDP, "stages=[pretrain,finetune]", "eval.baselines=[]", "eval.finetune.epochs=2",
                 "eval.finetune.batch_size=16", "eval.finetune.label_fractions=[1.0]",
                 "eval.finetune.backbone_lr_ratio=0.1", "eval.checkpoint_minutes=0",
                 f"eval.cache_dir={tmp_path / 'cache'}"]
    done = cli([str(QUICKSTART), "--out", str(tmp_path / "run"), *sets(overrides)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "train each run together" not in done.stdout
    run = json.loads((tmp_path / "run" / "results.json").read_text())["finetune"]["by_fraction"]["1.0"]
    run = run["by_seed"][0]
    assert run["processes"] == 1 and run["train_samples"] == 64 and run["epochs_run"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [r for r in records if r.get("stage") == "finetune/backbone/1.0/seed0" and "finetune/loss_step" in r]
    assert len(steps) == 2 * 64 // 16  # 4 batches of 16 per epoch: all 64 images, not 32
    assert not (tmp_path / "run" / "runs/finetune/backbone/1.0/seed0.partial").exists()


@pytest.mark.slow
def test_evaluate_under_torchrun_extracts_and_finetunes_together(tmp_path):
    """`ssl-pipeline evaluate` started by torchrun (2 processes, no pretraining: Lightning sets
    up no process group) joins the processes into one, as after DDP pretraining."""
    import timm

    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    overrides = [o for o in DDP if not o.startswith(("trainer.devices", "trainer.strategy", "stages"))]
    overrides += ["stages=[knn,finetune]", "eval.baselines=[]", "eval.finetune_processes=all",
                  "eval.finetune.epochs=1",
                  "eval.finetune.batch_size=16", "eval.finetune.label_fractions=[1.0]",
                  f"eval.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("SSL_PIPELINE_RUN_DIR", None)
    exe = Path(sys.executable).with_name("ssl-pipeline")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), str(exe), "evaluate", str(QUICKSTART), "--backbone", str(weights),
         "--out", str(tmp_path / "run"), *sets(overrides)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "features: 2 processes extract each split together" in done.stdout
    assert done.stdout.count("2 processes train each run together") == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "pretrain" not in results and results["knn"]["top1"] is not None
    run = results["finetune"]["by_fraction"]["1.0"]["by_seed"][0]
    assert run["processes"] == 2 and run["train_samples"] == 64 and run["epochs_run"] == 1
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 3  # train, val, test: once each


@pytest.mark.slow
def test_estimate_under_ddp_reports_once_with_the_evaluation_timed_by_rank_0(tmp_path):
    overrides = [*DDP, "stages=[pretrain,knn,finetune]", "eval.finetune.epochs=2"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("SSL_PIPELINE_RUN_DIR", None)
    exe = Path(sys.executable).with_name("ssl-pipeline")
    done = subprocess.run([str(exe), "estimate", str(QUICKSTART), "--steps", "2", "--warmup", "1",
                           *sets(overrides)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 cpu process(es)" in done.stdout
    assert done.stdout.count("projected total:") == 1 and "finetune" in done.stdout
    assert "sync_dist" not in done.stdout + done.stderr  # rank 0 fine-tunes alone: no such advice
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_estimate_under_torchrun_without_pretraining_projects_the_processes_together(tmp_path):
    """`ssl-pipeline estimate` of an evaluate-only recipe under torchrun joins the processes
    as `ssl-pipeline evaluate` does: features and fine-tuning are projected as 2 shares."""
    import timm

    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    overrides = [o for o in DDP if not o.startswith(("trainer.devices", "trainer.strategy", "stages"))]
    overrides += ["stages=[knn,finetune]", f"eval.backbone={weights}", "eval.baselines=[]",
                  "eval.finetune_processes=all", "eval.finetune.epochs=2",
                  "eval.finetune.label_fractions=[1.0]"]
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("SSL_PIPELINE_RUN_DIR", None)
    exe = Path(sys.executable).with_name("ssl-pipeline")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), str(exe), "estimate", str(QUICKSTART), "--steps", "2", "--warmup", "1",
         "--json", str(tmp_path / "estimate.json"), *sets(overrides)],
        capture_output=True, text=True, env=env, cwd=work, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("projected total:") == 1
    assert "on eval.backbone (2 cpu process(es)" in done.stdout
    assert "2 processes a shard each" in done.stdout
    figures = json.loads((tmp_path / "estimate.json").read_text())
    features, finetune = figures["evaluation"]["features"], figures["evaluation"]["finetune"]
    assert figures["world_size"] == 2 and features["processes"] == 2 and finetune["processes"] == 2
    # each process extracts half of the images at the rate rank 0 measured
    assert features["projected_seconds"] == pytest.approx(
        features["images"] / features["images_per_second"] / 2, abs=0.1 + 0.01 * features["projected_seconds"])
    assert not list(work.iterdir())  # nothing written


def assert_features_as_one_process_extracts_them(run_dir: Path, cache: Path) -> None:
    """The 2 processes extracted the features of each split together (a shard each, gathered
    on rank 0): the cached arrays are what one process extracts, row for row."""
    from ssl_pipeline.backbones import load_backbone
    from ssl_pipeline.data import build_dataset
    from ssl_pipeline.data.base import TransformedDataset
    from ssl_pipeline.data.transforms import eval_transform
    from ssl_pipeline.evaluation import fingerprint_of, split_key
    from ssl_pipeline.features import cache_key, extract_features, weights_hash
    from ssl_pipeline.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    data = build_dataset(recipe.data)
    backbone = load_backbone(run_dir / "backbone.safetensors")
    p = backbone.preprocessing
    transform = eval_transform(p.input_size, p.mean, p.std)
    fingerprint = fingerprint_of(recipe.data, data)
    for split in ("train", "val", "test"):
        key = cache_key(f"backbone:{weights_hash(backbone)}", transform,
                        split_key(data, split, fingerprint))
        with np.load(cache / f"{key}.npz") as saved:
            x, y = saved["features"], saved["labels"]
        loader = torch.utils.data.DataLoader(TransformedDataset(getattr(data, split), transform),
                                             batch_size=recipe.eval.batch_size)
        x1, y1 = extract_features(backbone, loader)
        assert np.array_equal(y, y1) and x.shape == x1.shape
        assert np.allclose(x, x1, atol=1e-5), np.abs(x - x1).max()


def test_processes_started_by_torchrun_or_srun_must_share_one_out_dir(monkeypatch, tiny_overrides):
    import ssl_pipeline
    from ssl_pipeline.errors import SSLPipelineError
    from ssl_pipeline.stages import is_global_zero

    monkeypatch.setenv("WORLD_SIZE", "16")
    with pytest.raises(SSLPipelineError, match="16 processes .* pass the same --out DIR"):
        ssl_pipeline.run(QUICKSTART, overrides=tiny_overrides)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not is_global_zero()  # srun's rank 3 writes nothing
    with pytest.raises(SSLPipelineError, match="8 processes"):
        ssl_pipeline.run(QUICKSTART, overrides=tiny_overrides)
