"""Pretraining on unlabeled domain images, watched by the online k-NN monitor on a separate
labeled dataset (`pretrain.monitor_data`)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def write_unlabeled(folder: Path, n: int = 40) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_unlabeled_pretraining_is_monitored_on_a_separate_labeled_dataset(tmp_path, tiny_overrides, capsys):
    write_unlabeled(tmp_path / "scans")
    out = tmp_path / "run"
    overrides = [*tiny_overrides, "stages=[pretrain]", "data.name=image_folder",
                 f"data.root={tmp_path / 'scans'}", "pretrain.monitor_data.name=fake",
                 "pretrain.monitor_data.fake.train_samples=30",
                 "pretrain.monitor_data.fake.val_samples=12"]
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out),
                 *sets(overrides)]) == 0
    assert "monitor: k-NN top-1 on fake (pretrain.monitor_data): bank 30 train images, " \
           "queries 12 val images" in capsys.readouterr().out
    pretrain = json.loads((out / "results.json").read_text())["pretrain"]
    assert pretrain["monitor_data"] == "fake"
    assert set(pretrain["monitor_knn_top1_by_epoch"]) == {"1", "2"}
    assert all(0 <= v <= 1 for v in pretrain["monitor_knn_top1_by_epoch"].values())


def test_an_unlabeled_monitor_dataset_is_a_clear_error(tmp_path, tiny_overrides, capsys):
    write_unlabeled(tmp_path / "scans")
    write_unlabeled(tmp_path / "more")
    overrides = [*tiny_overrides, "stages=[pretrain]", "data.name=image_folder",
                 f"data.root={tmp_path / 'scans'}", "pretrain.monitor_data.name=image_folder",
                 f"pretrain.monitor_data.root={tmp_path / 'more'}"]
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(tmp_path / "r"),
                 *sets(overrides)]) == 2
    assert "pretrain.monitor_data (image_folder) must be labeled" in capsys.readouterr().err
