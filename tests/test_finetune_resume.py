"""A fine-tuning run cut off part-way goes on from its last finished epoch and ends as an
uninterrupted run does: the same weights, the same validation history, the same metrics.jsonl."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import pytorch_lightning as pl
import torch

from ssl_pipeline import resume
from ssl_pipeline.backbones import create_backbone
from ssl_pipeline.evals.finetune import (
    EpochCheckpoint,
    FinetuneSettings,
    fit_finetuner,
    seeded_train_loader,
)
from ssl_pipeline.tracking import JSONLLogger


def separable(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Two classes of 16 px images, dark or bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    return torch.utils.data.TensorDataset(torch.rand(n, 3, 16, 16, generator=g) * 0.5
                                          + y.view(-1, 1, 1, 1) * 0.5, y)


def noisy(image: torch.Tensor) -> torch.Tensor:
    """A random augmentation: fresh noise at every read."""
    return image + 0.3 * torch.randn(image.shape)


class WithDropout(torch.nn.Module):
    """A backbone whose training draws from the global generator (dropout on its features)."""

    def __init__(self):
        super().__init__()
        self.backbone = create_backbone("timm:resnet18", in_chans=3, input_size=16)
        self.feature_dim = self.backbone.feature_dim
        self.dropout = torch.nn.Dropout(0.3)

    def forward(self, x):
        return self.dropout(self.backbone(x))


class CrashAt(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 2:  # two of its steps logged
            raise RuntimeError("simulated crash")


SETTINGS = FinetuneSettings(epochs=4, optimizer="adamw", lr=3e-3, backbone_lr_ratio=0.5, weight_decay=1e-4)


def fit(backbone, tmp_path, name, crash_at=None, seed=0, minutes=0.0, quiet=True, settings=SETTINGS):
    torch.manual_seed(seed)
    loaders = [seeded_train_loader(separable(48, 0), noisy, 16, seed=5),
               torch.utils.data.DataLoader(separable(32, 1), batch_size=16)]
    metrics = tmp_path / f"{name}.jsonl"
    kwargs = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, log_every_n_steps=1,
                  logger=[JSONLLogger(metrics, stage="finetune/x")],
                  callbacks=[CrashAt(crash_at)] if crash_at is not None else [])
    model, result = fit_finetuner(copy.deepcopy(backbone), 2, *loaders, settings, kwargs,
                                  checkpoint=tmp_path / f"{name}.ckpt", checkpoint_minutes=minutes,
                                  metrics=metrics, stage="finetune/x", quiet=quiet)
    return model, result, metrics


def records(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.open()]


@pytest.mark.slow
@pytest.mark.parametrize("validations", [None, 2])
def test_a_finetuning_run_resumed_after_a_crash_ends_as_an_uninterrupted_one(tmp_path, capsys, validations):
    """Also when only some epochs are validated (2 of 4: after epochs 2 and 4)."""
    settings = dataclasses.replace(SETTINGS, validations=validations)
    torch.manual_seed(0)
    backbone = WithDropout()
    whole, whole_fit, whole_metrics = fit(backbone, tmp_path, "whole", settings=settings)

    with pytest.raises(RuntimeError, match="simulated crash"):
        # in epoch 3, after epochs 1 and 2 were saved
        fit(backbone, tmp_path, "cut", crash_at=2, settings=settings)
    # another seed: a resume that did not restore the generators would drop other features
    resumed, resumed_fit, resumed_metrics = fit(backbone, tmp_path, "cut", seed=123, quiet=False,
                                                settings=settings)
    validated = [score is not None for score in whole_fit["val_top1_by_epoch"]]
    assert validated == ([True] * 4 if validations is None else [False, True, False, True])
    # one val_top1 record a validation, in the metrics file
    assert sum("finetune/val_top1" in r for r in records(whole_metrics)) == sum(validated)
    said = capsys.readouterr().out
    assert "finetune/x: resumed after epoch 2 of 4" in said
    assert "2 records logged after it dropped from cut.jsonl" in said  # epoch 3's two steps

    assert resumed_fit["this_call"]["epochs"] == 2 and whole_fit["this_call"]["epochs"] == 4
    for key in ("val_top1", "best_epoch", "val_top1_by_epoch", "epochs_run", "stopped_by_budget"):
        assert resumed_fit[key] == whole_fit[key], key
    assert len(resumed_fit["val_top1_by_epoch"]) == 4
    assert resumed_fit["seconds"] > resumed_fit["this_call"]["seconds"]  # the time before the crash too
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the best epoch's weights, bit for bit
    last = [torch.load(tmp_path / f"{name}.ckpt", weights_only=False)["state_dict"] for name in ("whole", "cut")]
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0])  # and the last epoch's
    assert records(resumed_metrics) == records(whole_metrics)  # nothing logged twice or lost

    # a finished run's checkpoint gives its model back without training again
    again, again_fit, _ = fit(backbone, tmp_path, "cut", seed=7)
    assert again_fit["this_call"]["epochs"] == 0 and again_fit["val_top1"] == whole_fit["val_top1"]
    assert all(torch.equal(a[k], v) for k, v in again.state_dict().items())


def test_a_checkpoint_cut_short_is_set_aside_and_the_run_starts_over(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("timm:resnet18", in_chans=3, input_size=16)
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.warns(UserWarning, match="does not read back whole"):
        _, result, _ = fit(backbone, tmp_path, "cut")
    assert result["this_call"]["epochs"] == 4 and len(result["val_top1_by_epoch"]) == 4


def test_checkpoints_come_every_n_minutes_and_when_the_run_finishes(tmp_path, monkeypatch):
    """With 60 minutes between saves a short run saves once, when it finishes (so a crash later
    in the run, in another grid pair, does not redo it); a crash before that starts over."""
    saved_epochs = []
    real_save = EpochCheckpoint.save

    def save(self, trainer, epochs):
        saved_epochs.append(epochs)
        real_save(self, trainer, epochs)

    monkeypatch.setattr(EpochCheckpoint, "save", save)
    torch.manual_seed(0)
    backbone = create_backbone("timm:resnet18", in_chans=3, input_size=16)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(backbone, tmp_path, "slow", crash_at=2, minutes=60)
    assert saved_epochs == [] and not (tmp_path / "slow.ckpt").exists()
    _, result, _ = fit(backbone, tmp_path, "slow", minutes=60)
    assert result["this_call"]["epochs"] == 4 and saved_epochs == [4]  # at the end only
    _, again, _ = fit(backbone, tmp_path, "slow", minutes=60)
    assert again["this_call"]["epochs"] == 0 and saved_epochs == [4]  # nothing to train or save
    assert again["val_top1_by_epoch"] == result["val_top1_by_epoch"]


def test_the_finetuning_loader_takes_every_image_in_a_process_group_too(monkeypatch):
    """Rank 0 fine-tunes alone after DDP pretraining, with the process group still up: its
    loader must not take only its DDP share of the images."""
    monkeypatch.setattr(resume, "process_group", lambda: (0, 2))
    loader = seeded_train_loader(separable(48, 0), noisy, 16, seed=5)
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == 48 and len(loader) == 3
    assert len(resume.ResumableSampler(48, seed=5)) == 24  # pretraining's sampler does shard


def test_the_finetuning_batches_do_not_depend_on_the_number_of_workers():
    """Each image's augmentation comes from its own seed: 0 or 2 loader workers, the same batches."""
    batches = {}
    for workers in (0, 2):
        loader = seeded_train_loader(separable(48, 0), noisy, 16, seed=5, num_workers=workers)
        batches[workers] = [torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in loader]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))


def test_a_budget_that_ends_a_run_between_validated_epochs_validates_where_it_stops():
    """With `validations`, a time budget that stops training before a validated epoch still
    validates the weights it stopped with (as when every epoch validates), so the run reports a
    validated score rather than none."""
    torch.manual_seed(0)
    backbone = create_backbone("timm:resnet18", in_chans=3, input_size=16)
    # 5 epochs, only the last validated; a budget of 0.6 ms stops training after its first step
    settings = dataclasses.replace(SETTINGS, epochs=5, validations=1, max_minutes=1e-5)
    loaders = [seeded_train_loader(separable(48, 0), noisy, 16, seed=5),
               torch.utils.data.DataLoader(separable(32, 1), batch_size=16)]
    kwargs = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
              "enable_model_summary": False, "enable_checkpointing": False, "logger": False}
    _, result = fit_finetuner(backbone, 2, *loaders, settings, kwargs)
    assert result["stopped_by_budget"]
    assert result["val_top1_by_epoch"] == [result["val_top1"]] and result["val_top1"] >= 0
    assert result["best_epoch"] == 1
