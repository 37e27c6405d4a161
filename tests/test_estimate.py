"""`ssl-pipeline estimate`: times a few steps of the recipe's pretraining and projects the stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ssl_pipeline.cli import main
from ssl_pipeline.data.base import TransformedDataset
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.estimate import describe, estimate

QUICKSTART = str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")


@pytest.mark.slow
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
    assert set(e["evaluation"]) == {"features", "knn", "linear_probe", "finetune", "projected_seconds"}
    assert "projected evaluation:" in printed and "projected total:" in printed
    assert not list(tmp_path.glob("reports*"))  # nothing written but the JSON asked for


def test_a_time_budget_caps_the_projection(tiny_overrides):
    e = estimate(QUICKSTART, [*tiny_overrides, "pretrain.epochs=1000", "pretrain.max_minutes=0.5"],
                 steps=2, warmup=1, quiet=True)
    assert e["stopped_by_budget"] and e["projected_seconds"] == 30.0


@pytest.mark.slow
def test_slow_data_is_named_as_the_bound(tiny_overrides, monkeypatch):
    real = TransformedDataset._item

    def slow(self, key, restore):
        time.sleep(0.05)  # 16 images per step: 0.8 s of waiting per step, more than a step of
        # compute takes on the slowest CPU seen (0.16 s was less than a Zen 1's compute)
        return real(self, key, restore)

    monkeypatch.setattr(TransformedDataset, "_item", slow)
    e = estimate(QUICKSTART, [*tiny_overrides, "data.num_workers=0"], steps=2, warmup=1, quiet=True)
    assert e["bound_by"] == "data loading" and e["data_wait_per_step"] > 0.75


@pytest.mark.parametrize("overrides, message", [
    (["stages=[knn]"], "no pretrain stage and no eval.backbone"),
    (["stages=[knn]", "eval.backbone=/nowhere/backbone.safetensors"], "nowhere"),
])
def test_what_cannot_be_estimated_is_a_clear_error(tiny_overrides, overrides, message):
    with pytest.raises(SSLPipelineError, match=message):
        estimate(QUICKSTART, [*tiny_overrides, *overrides], steps=4, warmup=1, quiet=True)


def test_a_dataset_with_fewer_batches_an_epoch_than_the_timed_steps_is_timed_over_more_epochs(
        tiny_overrides):
    # 2 steps an epoch x 2 epochs: the whole run is 4 steps, fewer than the 1 + 4 timed
    e = estimate(QUICKSTART, [*tiny_overrides, "data.fake.train_samples=32"], steps=4, warmup=1,
                 quiet=True)
    assert (e["measured_steps"], e["steps_per_epoch"], e["total_steps"]) == (4, 2, 4)
    assert e["projected_seconds"] >= 4 * e["seconds_per_step"]


def test_without_a_pretrain_stage_the_evaluation_of_eval_backbone_is_projected(tiny_overrides, tmp_path,
                                                                              capsys):
    from ssl_pipeline.backbones import create_backbone, export_backbone

    path = export_backbone(create_backbone("timm:resnet18", in_chans=3, input_size=16), tmp_path)
    assert main(["estimate", QUICKSTART, "--steps", "2", "--warmup", "1",
                 *[a for o in [*tiny_overrides, "stages=[knn, finetune]", f"eval.backbone={path}"]
                   for a in ("--set", o)]]) == 0
    printed = capsys.readouterr().out
    assert "no pretrain stage: the evaluation stages on eval.backbone" in printed
    assert "projected evaluation:" in printed and "finetune" in printed and "measured:" not in printed


@pytest.mark.slow
def test_estimate_projects_finetuning_runs_and_feature_extraction(tiny_overrides):
    """Every fine-tuning run is projected (backbone and random init, each label fraction's
    seeds and epochs, each grid pair), from the timed step, validation, test and save; per-run
    budgets cap the training; features are projected for every split of both backbones."""
    overrides = [*tiny_overrides, "data.fake.train_samples=64", "stages=[pretrain, knn, finetune]",
                 "eval.baselines=[random_init, raw_pixels]", "eval.seeds=2",
                 "eval.finetune.label_fractions=[0.5, 1.0]", "eval.finetune.epochs={0.5: 5, 1.0: 3}",
                 "eval.finetune.batch_size=16", "eval.finetune.lr=[0.01, 0.001]",
                 "eval.finetune.backbone_lr_ratio=0.1", "eval.checkpoint_minutes=0",
                 "eval.finetune.full_data_seeds=3", "eval.finetune.validations=2"]
    e = estimate(QUICKSTART, overrides, steps=3, warmup=1, quiet=True)
    ft = e["evaluation"]["finetune"]
    assert ft["runs"] == 2 * (2 + 3) * 2 and ft["grid_pairs"] == 2 and ft["backbones"] == 2
    half, whole = ft["by_fraction"]
    assert (half["seeds"], whole["seeds"]) == (2, 3) and whole["images"] == 64
    assert whole["steps_per_epoch"] == 4 and half["steps_per_epoch"] == half["images"] // 16
    assert (half["epochs"], whole["epochs"]) == (5, 3) and ft["epochs"] == [5, 3]
    # 2 validations: after epochs 3 and 5 of 5, 2 and 3 of 3
    assert (half["validation_passes"], whole["validation_passes"]) == (2, 2)
    assert "validation " in describe(e) and " s a pass, 2/2 passes a run)" in describe(e)
    expected = slack = 0.0
    for part in (half, whole):
        epochs = part["epochs"]
        pair = epochs * part["steps_per_epoch"] * ft["seconds_per_step"] + 2 * ft["validation_pass_seconds"] \
            + epochs * ft["checkpoint_save_seconds"]  # a save every epoch (checkpoint_minutes=0)
        expected += 2 * part["seeds"] * (2 * pair + ft["test_pass_seconds"])
        # the figures are shown rounded (step to 4 places, passes and saves to 3): their
        # rounding, summed over every use, bounds how far the recomputation may drift
        slack += 2 * part["seeds"] * (2 * epochs * (part["steps_per_epoch"] * 5e-5 + 5e-4 + 5e-4) + 5e-4)
    assert ft["projected_seconds"] == pytest.approx(expected, abs=0.05 + slack), \
        (ft["projected_seconds"], expected, slack)
    features = e["evaluation"]["features"]
    assert features["images"] == 2 * (64 + 16 + 16)
    assert features["projected_seconds"] == pytest.approx(
        features["images"] / features["images_per_second"], abs=0.1)
    knn = e["evaluation"]["knn"]  # the backbone, random init and raw pixels (3 x 16 x 16 = 768)
    assert knn["subjects"] == 3 and knn["dimensions"] == [512, 768]  # ResNet-18's features, pixels
    parts = [e["evaluation"][k]["projected_seconds"] for k in ("features", "knn", "finetune")]
    assert e["evaluation"]["projected_seconds"] == pytest.approx(sum(parts), abs=0.2)
    assert e["projected_total_seconds"] == pytest.approx(
        e["projected_seconds"] + e["evaluation"]["projected_seconds"], abs=0.2)

    budget = 1e-4  # minutes per run: each run stops after its first epoch
    capped = estimate(QUICKSTART, [*overrides, f"eval.finetune.max_minutes={budget}"], steps=3,
                      warmup=1, quiet=True)["evaluation"]["finetune"]
    assert all(part["epochs_run"] == 1 and part["checkpoint_saves"] == 1 for part in capped["by_fraction"])
    most = sum(2 * p["seeds"] * (2 * (60 * budget + capped["checkpoint_save_seconds"])
                                 + capped["test_pass_seconds"]) for p in capped["by_fraction"])
    slack = sum(2 * p["seeds"] * (2 * 5e-4 + 5e-4) for p in capped["by_fraction"])
    assert capped["projected_seconds"] == pytest.approx(most, abs=0.05 + slack), \
        (capped["projected_seconds"], most, slack)


def test_a_suite_is_estimated_variant_by_variant_with_baselines_evaluated_once(
        tmp_path, tiny_overrides, capsys):
    """Each variant is estimated as its own recipe; a variant whose baselines an earlier one
    evaluates (same backbone, data, evaluation, seed) leaves them out, as a run reuses them;
    one with another seed has its own. A variant that cannot be estimated is named with the
    reason, after the others' figures (exit status 2)."""
    import yaml

    from ssl_pipeline.recipe import apply_overrides

    base = apply_overrides({}, [*tiny_overrides, "stages=[pretrain, knn]",
                                "eval.baselines=[random_init, raw_pixels]"])
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"suite": {"base": base, "variants": {
        "simclr": {}, "supervised": {"method": {"name": "supervised"}}, "other_seed": {"seed": 1},
        "broken": {"pretrain": {"batch_size": 1000}}}}},  # more than the images
                                    sort_keys=False))
    out = tmp_path / "estimate.json"
    assert main(["estimate", str(suite), "--steps", "2", "--warmup", "1", "--json", str(out)]) == 2
    said = capsys.readouterr()
    printed = said.out
    e = json.loads(out.read_text())
    assert e["failed"] == ["broken"] and "larger than the" in e["variants"].pop("broken")["error"]
    assert "variant broken: cannot be estimated: pretrain.batch_size=1000" in printed
    assert "variant(s) broken cannot be estimated" in said.err
    variants = e["variants"]
    assert list(variants) == ["simclr", "supervised", "other_seed"]
    assert [v["baselines_reused"] for v in variants.values()] == [[], ["random_init", "raw_pixels"], []]
    # k-NN subjects: the backbone, random init and raw pixels; the backbone alone when reused
    assert [v["evaluation"]["knn"]["subjects"] for v in variants.values()] == [3, 1, 3]
    assert e["projected_total_seconds"] == pytest.approx(
        sum(v["projected_total_seconds"] for v in variants.values()), abs=0.2)
    assert "variant supervised (reusing an earlier variant's random_init, raw_pixels):" in printed
    assert printed.count("  measured:") == 3 and "suite projected total:" in printed
