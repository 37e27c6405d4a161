"""`ssl-pipeline estimate`: times a few steps of the recipe's pretraining and projects the stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ssl_pipeline.cli import main
from ssl_pipeline.data.base import TransformedDataset
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.estimate import estimate

QUICKSTART = str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")


def test_estimate_projects_the_stage_from_a_few_steps(tmp_path, tiny_overrides, capsys):
    overrides = [*tiny_overrides, "data.fake.train_samples=160", "pretrain.epochs=7",
                 "pretrain.monitor_every_n_epochs=3", "pretrain.checkpoint_every_n_steps=4"]
    out = tmp_path / "estimate.json"
    assert main(["estimate", QUICKSTART, "--steps", "4", "--warmup", "1", "--json", str(out),
                 *[a for o in overrides for a in ("--set", o)]]) == 0
    printed = capsys.readouterr().out
    e = json.loads(out.read_text())
    assert e["measured_steps"] == 4 and e["steps_per_epoch"] == 10 and e["total_steps"] == 70
    assert e["monitor_passes"] == 3  # epochs 3, 6 and the last
    assert e["checkpoint_saves"] == 7 + 70 // 4 + 3
    parts = (e["startup_seconds"] + 70 * e["seconds_per_step"]
             + e["checkpoint_saves"] * e["checkpoint_save_seconds"]
             + 3 * e["monitor_pass_seconds"])
    assert e["projected_seconds"] == pytest.approx(parts, abs=0.2)
    assert 0 <= e["data_wait_per_step"] < e["seconds_per_step"]
    assert e["images_per_second"] == pytest.approx(16 / e["seconds_per_step"], rel=0.01)
    assert e["peak_memory_mb"] > 0 and e["bound_by"] in ("compute", "data loading")
    assert "projected:" in printed and "bound by:" in printed
    assert not list(tmp_path.glob("reports*"))  # nothing written but the JSON asked for


def test_a_time_budget_caps_the_projection(tiny_overrides):
    e = estimate(QUICKSTART, [*tiny_overrides, "pretrain.epochs=1000", "pretrain.max_minutes=0.5"],
                 steps=2, warmup=1, quiet=True)
    assert e["stopped_by_budget"] and e["projected_seconds"] == 30.0


def test_slow_data_is_named_as_the_bound(tiny_overrides, monkeypatch):
    real = TransformedDataset._item

    def slow(self, key, restore):
        time.sleep(0.01)  # 16 images per step: 0.16 s of waiting per step
        return real(self, key, restore)

    monkeypatch.setattr(TransformedDataset, "_item", slow)
    e = estimate(QUICKSTART, [*tiny_overrides, "data.num_workers=0"], steps=2, warmup=1, quiet=True)
    assert e["bound_by"] == "data loading" and e["data_wait_per_step"] > 0.15


@pytest.mark.parametrize("override, message", [
    ("stages=[knn]", "no pretrain stage"),
    ("data.fake.train_samples=32", "only"),  # 2 steps per epoch x 2 epochs < 4 + 1
])
def test_what_cannot_be_estimated_is_a_clear_error(tiny_overrides, override, message):
    with pytest.raises(SSLPipelineError, match=message):
        estimate(QUICKSTART, [*tiny_overrides, override, "eval.backbone=x"], steps=4, warmup=1,
                 quiet=True)
