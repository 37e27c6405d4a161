"""The classic linear probe (frozen backbone on augmented images): the backbone is untouched,
BatchNorm statistics included, and the head learns; through the pipeline as a stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

import ssl_pipeline
from ssl_pipeline.backbones import create_backbone
from ssl_pipeline.evals.finetune import FinetuneSettings, finetune

QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"


def separable(n: int, seed: int):
    """Two classes of 16 px images: dark or bright, with noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.5 + y.view(-1, 1, 1, 1) * 0.5
    return torch.utils.data.TensorDataset(x, y)


def test_a_frozen_probe_leaves_the_backbone_bit_identical_and_learns_a_head():
    torch.manual_seed(0)
    backbone = create_backbone("timm:resnet18", in_chans=3, input_size=16).train()
    before = copy.deepcopy(backbone.state_dict())  # BatchNorm running statistics included
    loaders = [torch.utils.data.DataLoader(separable(n, seed), batch_size=16, shuffle=seed == 0)
               for n, seed in ((64, 0), (32, 1), (32, 2))]
    settings = FinetuneSettings(epochs=4, optimizer="lars", lr=0.5, backbone_lr_ratio=0.0,
                                weight_decay=0.0, frozen=True)
    result = finetune(backbone, 2, *loaders, settings,
                      dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False, enable_checkpointing=False))
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result["top1"] >= 0.9 and result["best_epoch"] >= 1


def test_the_classic_probe_stage_runs_and_records_its_protocol(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "stages=[pretrain,linear_probe_classic]",
                 "eval.linear_probe_classic.epochs=2", "eval.linear_probe_classic.batch_size=16",
                 "eval.baselines=[random_init]"]
    result = ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=tmp_path / "run", quiet=True)
    probe = result.results["linear_probe_classic"]
    assert 0 <= probe["top1"] <= 1 and probe["batch_size"] == 16
    assert probe["lr"] == 0.1 * 16 / 256  # lr 0.1 x batch/256, as SimSiam's main_lincls.py
    assert "frozen backbone" in probe["protocol"] and probe["by_seed"][0]["epochs_run"] == 2
    assert "linear_probe_classic" in result.results["baselines"]["random_init"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "linear_probe_classic" in report
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["linear_probe_classic"]["top1"] == probe["top1"]
