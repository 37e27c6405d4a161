"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist (the default: `-n auto --maxprocesses=4` in pyproject.toml) each worker
    process gets its share of the cores this process may use for torch's and BLAS's threads, set
    before torch is imported, so two workers on 2 cores do not run 4 spinning threads;
    subprocesses the tests start inherit it. Without xdist (`-n 0`) nothing is set."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = str(max(1, (cores or 1) // int(workers)))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, threads)


def pytest_collection_modifyitems(config, items):
    """The long (`slow`) tests first, the quickstart run (the longest) first of all, so that
    workers sharing the suite start them early instead of one worker running them alone at the
    end (the order within each group is unchanged)."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 item.name != "test_quickstart_as_a_user_runs_it"))


@pytest.fixture(scope="session")
def fashion_mnist_root() -> Path:
    """The Debian package's Fashion-MNIST folder.

    Skips when the package is not installed, except in CI (CI=true), which must have it: there a
    missing package fails instead of silently skipping the tests on real data.
    """
    from ssl_pipeline.data.fashion_mnist import DEBIAN_DIR, find_files

    if find_files(DEBIAN_DIR) is None:
        message = (
            f"Fashion-MNIST IDX files not found in {DEBIAN_DIR}; "
            "install the Debian package: apt-get install dataset-fashion-mnist"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return DEBIAN_DIR


@pytest.fixture(autouse=True)
def no_wandb_by_default(monkeypatch):
    """Tests run without W&B unless a test turns it on (W&B's env var overrides the recipe)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("SSL_PIPELINE_RUN_DIR", raising=False)


# Overrides that turn any recipe into a seconds-long smoke run on tiny synthetic data. The
# backbone keeps its default stem (a ResNet's stride-4 stem, as at the recipes' 224 px): stem
# `auto` would pick the small stride-1 stem at 16 px, 16x the convolutions' work for nothing a
# smoke run checks (the small stem runs end to end in the quickstart test and in
# test_backbones.py). Fine-tuning trains 2 epochs a grid pair (the quickstart's 10 cost
# ~0.3 s an epoch of Lightning's loop and validation even on 48 images); tests about
# fine-tuning set their own epochs.
TINY = [
    "data.name=fake",
    "data.image_size=16",
    "backbone.stem=default",
    "eval.finetune.epochs=2",
    "data.fake.train_samples=48",
    "data.fake.val_samples=16",
    "data.fake.test_samples=16",
    "pretrain.epochs=2",
    "pretrain.batch_size=16",
    "pretrain.monitor_every_n_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_nodes=1",
    "trainer.precision=32",
    "trainer.log_every_n_steps=1",
    "tracking.wandb.mode=disabled",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
