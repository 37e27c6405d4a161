"""Bad numbers: a NaN loss stops the run with a message naming where (or is skipped and
counted, if the recipe says so); a collapsing SimSiam is warned about in the log and report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssl_pipeline.cli import main
from ssl_pipeline.methods.simclr import SimCLR

QUICKSTART = str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")


@pytest.fixture
def nan_at_steps(monkeypatch):
    """SimCLR's loss becomes NaN at the given global steps."""

    def install(*steps: int):
        real = SimCLR.training_loss

        def loss_with_nans(self, batch):
            loss, extras = real(self, batch)
            if self.trainer.global_step in steps:
                loss = loss * float("nan")
            return loss, extras

        monkeypatch.setattr(SimCLR, "training_loss", loss_with_nans)

    return install


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoint(
        tmp_path, tiny_overrides, nan_at_steps, capsys):
    nan_at_steps(4)  # epoch 2 of 3-step epochs: epoch 1's checkpoint exists
    out = tmp_path / "run"
    status = main(["run", QUICKSTART, "--quiet", "--out", str(out), *sets(tiny_overrides)])
    err = capsys.readouterr().err
    assert status == 1
    assert "NonFiniteLoss" in err and "nan at step 4 (epoch 2, batch 1)" in err
    assert "pretrain.on_nonfinite_loss=skip" in err  # says how to go on
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    run_state = json.loads((out / "run_state.json").read_text())["stages"]["pretrain"]
    assert run_state["status"] == "failed" and "NonFiniteLoss" in run_state["error"]


def test_skip_drops_nan_steps_counts_them_and_finishes(tmp_path, tiny_overrides, nan_at_steps):
    nan_at_steps(1, 4)
    out = tmp_path / "run"
    status = main(["run", QUICKSTART, "--quiet", "--out", str(out), *sets(tiny_overrides),
                   "--set", "pretrain.on_nonfinite_loss=skip", "--set", "stages=[pretrain]"])
    assert status == 0
    result = json.loads((out / "results.json").read_text())["pretrain"]
    assert result["skipped_nonfinite_steps"] == 2
    assert result["steps"] == 6
    assert all(math.isfinite(x) for x in result["loss_by_epoch"])  # the epoch losses stay finite
    assert "| pretraining steps skipped (non-finite loss) | 2 |" in (out / "report.md").read_text()


def test_simsiam_collapse_is_warned_in_the_log_results_and_report(tmp_path, tiny_overrides, capsys):
    # A threshold no healthy run meets stands in for a collapse.
    extra = ["method.name=simsiam", "method.simsiam.collapse_warn_below=100", "stages=[pretrain]"]
    with pytest.warns(UserWarning, match="SimSiam may have collapsed"):
        status = main(["run", QUICKSTART, "--quiet", "--out", str(tmp_path / "run"),
                       *sets([*tiny_overrides, *extra])])
    assert status == 0
    warnings = json.loads((tmp_path / "run" / "results.json").read_text())["pretrain"]["warnings"]
    assert len(warnings) == 1 and "2 epoch(s) so far, first at epoch 1" in warnings[0]
    assert "SimSiam may have collapsed" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
def test_a_healthy_simsiam_run_has_no_collapse_warning(tmp_path, tiny_overrides):
    status = main(["run", QUICKSTART, "--quiet", "--out", str(tmp_path / "run"),
                   *sets([*tiny_overrides, "method.name=simsiam", "stages=[pretrain]"])])
    assert status == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["pretrain"]["warnings"] == []
