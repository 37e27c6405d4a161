"""Evaluation stages through the pipeline: results.json shape, baselines, feature cache,
frozen backbones, evaluate and embed commands."""

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import pytorch_lightning as pl
import torch

import ssl_pipeline
from ssl_pipeline import evaluation
from ssl_pipeline.cli import main
from ssl_pipeline.compute import channels_last
from ssl_pipeline import features as features_module
from ssl_pipeline.features import cache_key, cached_features, extract_features, weights_hash
from ssl_pipeline.evals.finetune import validated_epochs
from ssl_pipeline.provenance import code_fingerprint
from ssl_pipeline.backbones import create_backbone, export_backbone
from conftest import TINY

QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
EVAL_TINY = [
    "eval.seeds=2",
    "eval.linear_probe.epochs=5",
    "eval.finetune.epochs=2",
    "eval.finetune.label_fractions=[0.25, 1.0]",
    "eval.few_shot.shots=[1, 2]",
    "eval.few_shot.seeds=2",
    "eval.knn.settings=[[5, 0.07], [10, 0.1]]",
]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """One tiny run with every evaluation stage, shared by the tests that only read it."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("runs") / "run"
    overrides = [*TINY, *EVAL_TINY, f"eval.cache_dir={cache}",
                 "stages=[pretrain, knn, linear_probe, few_shot, finetune]"]
    result = ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=out, quiet=True)
    return result, cache, overrides


@pytest.mark.slow
def test_results_json_has_the_documented_shape(evaluated_run):
    result, _, _ = evaluated_run
    results = json.loads((result.run_dir / "results.json").read_text())
    assert results["schema_version"] == 1
    assert {"git_commit", "packages", "split_hashes"} <= set(results["provenance"])
    knn = results["knn"]
    assert 0 <= knn["top1"] <= 1 and set(knn["by_k"]) == {"5", "10"}
    assert len(knn["confusion_matrix"]) == 4 and "balanced_accuracy" in knn and "macro_f1" in knn
    probe = results["linear_probe"]
    assert probe["seeds"] == 2 and probe["top1_std"] >= 0 and set(probe["chosen"]) == {"lr", "weight_decay"}
    finetune = results["finetune"]
    assert set(finetune["by_fraction"]) == {"0.25", "1.0"}
    assert finetune["by_fraction"]["0.25"]["seeds"] == 2 and finetune["by_fraction"]["1.0"]["seeds"] == 1
    assert finetune["by_fraction"]["0.25"]["train_samples"] == 12  # 48 images, 4 classes, 25%
    shots = results["few_shot"]["by_shots"]
    assert set(shots) == {"1", "2"} and len(shots["2"]["ci95"]) == 2
    baselines = results["baselines"]
    assert set(baselines["random_init"]) == {"knn", "linear_probe", "few_shot", "finetune"}
    assert set(baselines["raw_pixels"]) == {"knn", "linear_probe", "few_shot"}  # nothing to fine-tune


def test_the_run_writes_its_report(evaluated_run):
    result, _, _ = evaluated_run
    html = (result.run_dir / "report.html").read_text()
    # 4 stages for the backbone, 4 for random init, 3 for raw pixels (nothing to fine-tune)
    assert html.count('class="result-row"') == 11
    assert (result.run_dir / "report.md").is_file()
    assert {p.name for p in (result.run_dir / "plots").glob("*.png")} >= {"pretrain_loss_lr.png", "monitor.png"}


def test_features_are_cached_and_reused(evaluated_run, tmp_path):
    result, cache, overrides = evaluated_run
    files = sorted(cache.glob("*.npz"))
    # 3 subjects (backbone, random_init, raw_pixels) x 3 splits
    assert len(files) == 9
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = ssl_pipeline.run(QUICKSTART, overrides=[*overrides, "stages=[knn]",
                                                    f"eval.backbone={result.run_dir}"],
                             out_dir=tmp_path / "again", quiet=True)
    assert sorted(cache.glob("*.npz")) == files  # nothing new extracted
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files)
    assert again.results["knn"]["top1"] == result.results["knn"]["top1"]


@pytest.mark.slow
def test_baselines_are_reused_across_runs_only_when_everything_matches(tiny_overrides, tmp_path,
                                                                       monkeypatch):
    cache = tmp_path / "cache"
    base = [*tiny_overrides, "stages=[pretrain, knn, linear_probe]", "pretrain.epochs=1",
            "eval.seeds=2", "eval.linear_probe.epochs=3", f"eval.cache_dir={cache}"]

    def run(name, *extra):
        result = ssl_pipeline.run(QUICKSTART, overrides=[*base, *extra], out_dir=tmp_path / name,
                                  quiet=True)
        return result.results["baselines"]

    first = run("first")
    assert not any("reused" in r for b in first.values() for r in b.values())
    assert len(list((cache / "baselines").glob("*.json"))) == 4  # 2 baselines x 2 stages
    # another method (a suite's next variant): the same baselines, read back, not recomputed
    second = run("second", "method.name=supervised")
    for name, stages in first.items():
        for stage, result in stages.items():
            assert second[name][stage] == {**result, "reused": True}
    # a different evaluation setting is a different baseline; reuse can be switched off
    third = run("third", "eval.seeds=3")
    assert third["random_init"]["linear_probe"]["seeds"] == 3
    assert not any("reused" in r for b in third.values() for r in b.values())
    fourth = run("fourth", "eval.reuse_baselines=false")
    assert not any("reused" in r for b in fourth.values() for r in b.values())
    # a torn entry is recomputed, not an error
    for entry in (cache / "baselines").glob("*.json"):
        entry.write_text("{")
    fifth = run("fifth")
    assert fifth["raw_pixels"]["knn"]["top1"] == first["raw_pixels"]["knn"]["top1"]
    assert "reused" not in fifth["raw_pixels"]["knn"]
    # other code (an edited or upgraded checkout) computes its own baselines
    monkeypatch.setattr(evaluation, "code_fingerprint", lambda: "edited")
    sixth = run("sixth")
    assert not any("reused" in r for b in sixth.values() for r in b.values())


def test_code_fingerprint_follows_the_source_files(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    fingerprint = code_fingerprint.__wrapped__  # uncached
    first = fingerprint(tmp_path / "pkg")
    assert fingerprint(tmp_path / "pkg") == first
    (tmp_path / "pkg" / "notes.txt").write_text("still not code")
    assert fingerprint(tmp_path / "pkg") == first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    assert fingerprint(tmp_path / "pkg") != first
    assert code_fingerprint() == code_fingerprint()  # the package's, cached


def test_cache_key_changes_with_weights_transform_split_and_code(tmp_path, monkeypatch):
    torch.manual_seed(0)
    a = create_backbone("timm:resnet18", in_chans=1, input_size=8)
    b = create_backbone("timm:resnet18", in_chans=1, input_size=8)
    assert weights_hash(a) != weights_hash(b)
    base = cache_key(weights_hash(a), "t1", "s1")
    assert base == cache_key(weights_hash(a), "t1", "s1")
    assert len({base, cache_key(weights_hash(b), "t1", "s1"), cache_key(weights_hash(a), "t2", "s1"),
                cache_key(weights_hash(a), "t1", "s2")}) == 4
    monkeypatch.setattr(features_module, "code_fingerprint", lambda: "edited")
    assert cache_key(weights_hash(a), "t1", "s1") != base  # other code extracts its own
    images = torch.rand(10, 1, 8, 8)
    loader = torch.utils.data.DataLoader(list(zip(images, range(10))), batch_size=4)
    x1, y1, hit1 = cached_features(a, loader, tmp_path, base)
    x2, y2, hit2 = cached_features(a, loader, tmp_path, base)
    assert (hit1, hit2) == (False, True) and np.array_equal(x1, x2) and list(y2) == list(range(10))


def test_probe_and_knn_leave_the_backbone_bit_identical(evaluated_run, tmp_path):
    result, cache, overrides = evaluated_run
    before = safetensors.torch.load_file(result.run_dir / "backbone.safetensors")
    ssl_pipeline.run(QUICKSTART, overrides=[*overrides, "stages=[knn, linear_probe, few_shot]",
                                            f"eval.backbone={result.run_dir}", "eval.baselines=[]"],
                     out_dir=tmp_path / "probe", quiet=True)
    after = safetensors.torch.load_file(result.run_dir / "backbone.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_linear_probe_never_changes_backbone_weights_in_memory(tiny_overrides, tmp_path):
    from ssl_pipeline import evaluation
    from ssl_pipeline.pipeline import run

    seen = {}
    original = evaluation.evaluated_backbone

    def spy(ctx):
        backbone = original(ctx)
        seen.setdefault("before", {k: v.clone() for k, v in backbone.state_dict().items()})
        seen["backbone"] = backbone
        return backbone

    evaluation.evaluated_backbone = spy
    try:
        run(QUICKSTART, overrides=[*tiny_overrides, *EVAL_TINY, f"eval.cache_dir={tmp_path / 'c'}",
                                   "stages=[pretrain, linear_probe]"], out_dir=tmp_path / "r", quiet=True)
    finally:
        evaluation.evaluated_backbone = original
    after = seen["backbone"].state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)


def test_evaluate_command_on_an_exported_backbone(evaluated_run, tmp_path, capsys):
    result, cache, overrides = evaluated_run
    sets = [x for o in overrides if not o.startswith("stages=") for x in ("--set", o)]
    code = main(["evaluate", str(QUICKSTART), "--backbone", str(result.run_dir), "--out",
                 str(tmp_path / "ev"), "--quiet", *sets, "--set", "stages=[knn]"])
    assert code == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert "pretrain" not in results and results["knn"]["top1"] == result.results["knn"]["top1"]
    assert "knn test top-1" in capsys.readouterr().out


def test_eval_stage_without_a_backbone_is_a_clear_error(tiny_overrides, tmp_path, capsys):
    sets = [x for o in tiny_overrides for x in ("--set", o)]
    assert main(["run", str(QUICKSTART), "--out", str(tmp_path / "r"), *sets,
                 "--set", "stages=[knn]"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_embed_writes_features_with_paths(evaluated_run, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        Image.new("RGB", (20, 24), (40 * i, 10, 200)).save(folder / name)
    result, _, _ = evaluated_run
    assert main(["embed", "--backbone", str(result.run_dir), "--data", str(folder),
                 "--out", str(tmp_path / "emb.npz"), "--quiet"]) == 0
    saved = np.load(tmp_path / "emb.npz")
    assert saved["features"].shape == (3, 512)
    assert list(saved["paths"]) == ["a.png", "b.jpg", "sub/c.png"]


def test_random_init_baseline_has_no_dead_residual_branches():
    """timm zero-initializes the last BatchNorm of each block; the baseline resets it to one."""
    from types import SimpleNamespace

    from ssl_pipeline.evaluation import random_init_like

    reference = create_backbone("timm:resnet18", in_chans=1, input_size=8)
    assert any(not m.weight.any() for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d))
    ctx = SimpleNamespace(cache={})
    fresh = random_init_like(reference, seed=0, ctx=ctx)
    assert all(m.weight.any() for m in fresh.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert weights_hash(fresh) != weights_hash(reference)


def test_channels_last_extraction_gives_the_same_features_hash_and_export(tmp_path):
    """trainer.channels_last (default) changes the weights' memory layout only: the features
    agree with a contiguous model's, and the weights hash and exported file do not change."""
    torch.manual_seed(0)
    plain = create_backbone("timm:resnet18", in_chans=1, input_size=16).eval()
    fast = channels_last(create_backbone("timm:resnet18", in_chans=1, input_size=16).eval())
    fast.load_state_dict(plain.state_dict())
    conv = fast.model.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.randn(40, 1, 16, 16)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.zeros(40, dtype=torch.long)), batch_size=16)
    x_plain, _ = extract_features(plain, loader)
    x_fast, _ = extract_features(fast, loader)
    np.testing.assert_allclose(x_fast, x_plain, atol=1e-5)
    assert weights_hash(fast) == weights_hash(plain)
    export_backbone(plain, tmp_path / "plain")
    export_backbone(fast, tmp_path / "fast")
    assert (tmp_path / "plain" / "backbone.safetensors").read_bytes() == \
        (tmp_path / "fast" / "backbone.safetensors").read_bytes()


@pytest.mark.slow
def test_finetune_grid_is_chosen_on_validation_and_tested_once(tiny_overrides, tmp_path, monkeypatch):
    """A grid of (lr, backbone_lr_ratio) pairs: every pair trains from the same start, the pair
    with the best validation score is reported, and only its model ever sees the test split."""
    real_fit, real_test = evaluation.fit_finetuner, evaluation.held_out_metrics
    preferred = (1e-9, 1.0)  # the pair the scripted validation scores favour
    tested = []

    def fit(backbone, num_classes, train, val, settings, trainer_kwargs, multi_label=False, **kwargs):
        model, info = real_fit(backbone, num_classes, train, val, settings, trainer_kwargs, multi_label,
                               **kwargs)
        pair = (settings.lr, settings.backbone_lr_ratio)
        return model, {**info, "val_top1": 0.9 if pair == preferred else 0.5}

    def held_out(model, loader, class_names=None):
        tested.append((model.settings.lr, model.settings.backbone_lr_ratio))
        return real_test(model, loader, class_names)

    monkeypatch.setattr(evaluation, "fit_finetuner", fit)
    monkeypatch.setattr(evaluation, "held_out_metrics", held_out)
    overrides = [*tiny_overrides, "pretrain.epochs=1", "stages=[pretrain, finetune]",
                 "eval.finetune.epochs=1", "eval.finetune.label_fractions=[1.0]",
                 "eval.finetune.lr=[0.01, 1e-9]", "eval.finetune.backbone_lr_ratio=[0.1, 1.0]",
                 "eval.baselines=[random_init]", f"eval.cache_dir={tmp_path / 'cache'}"]
    result = ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=tmp_path / "run", quiet=True)
    results = json.loads((result.run_dir / "results.json").read_text())
    for finetune in (results["finetune"], results["baselines"]["random_init"]["finetune"]):
        run = finetune["by_fraction"]["1.0"]["by_seed"][0]
        pairs = [(g["lr"], g["backbone_lr_ratio"]) for g in run["grid"]]
        assert pairs == [(0.01, 0.1), (0.01, 1.0), (1e-9, 0.1), (1e-9, 1.0)]
        assert (run["lr"], run["backbone_lr_ratio"]) == preferred and run["val_top1"] == 0.9
        assert finetune["chosen"] == {"lr": 1e-9, "backbone_lr_ratio": 1.0}
        assert 0 <= finetune["top1"] <= 1
    assert tested == [preferred, preferred]  # the test split: once per subject, chosen model only
    stages = {json.loads(line).get("stage") for line in (result.run_dir / "metrics.jsonl").open()}
    assert {f"finetune/backbone/1.0/seed0/lr{lr:g}_ratio{r:g}" for lr, r in pairs} <= stages
    assert "chosen lr=1e-09, backbone_lr_ratio=1" in (result.run_dir / "report.md").read_text()


def test_finetune_grid_values_are_checked(tmp_path, capsys):
    """One clear line per bad value, naming the key (and the list item), not pydantic's union
    branches ("constrained-float", "list[...]") nor the branch the value did not take."""
    for bad, key, why in [("[]", "eval.finetune.lr:", "at least one value"),
                          ("[0.01, 0.01]", "eval.finetune.lr:", "no repeats"),
                          ("[0.01, -1]", "eval.finetune.lr.1:", "greater than 0 (got -1)"),
                          ("-1", "eval.finetune.lr:", "greater than 0 (got -1)"),
                          ("abc", "eval.finetune.lr:", "valid number")]:
        code = main(["validate", str(QUICKSTART), "--set", f"eval.finetune.lr={bad}"])
        err = capsys.readouterr().err
        assert code == 2 and f"{key} " in err and why in err, err
        assert len(err.strip().splitlines()) == 1 and "constrained" not in err and "Value error" not in err, err


@pytest.mark.slow
def test_finetune_epochs_may_differ_per_label_fraction(tiny_overrides, tmp_path):
    """`eval.finetune.epochs` as a mapping: each label fraction's runs train its own epochs
    (SimCLR: 60 on 1% of the labels, 30 on 10%), recorded with the fraction's results."""
    overrides = [*tiny_overrides, "pretrain.epochs=1", "stages=[pretrain, finetune]",
                 "eval.finetune.label_fractions=[0.5, 1.0]", "eval.finetune.epochs={0.5: 3, 1.0: 1}",
                 "eval.seeds=1", "eval.baselines=[]", f"eval.cache_dir={tmp_path / 'cache'}"]
    result = ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=tmp_path / "run", quiet=True)
    by_fraction = json.loads((result.run_dir / "results.json").read_text())["finetune"]["by_fraction"]
    assert by_fraction["0.5"]["epochs"] == 3 and by_fraction["1.0"]["epochs"] == 1
    assert by_fraction["0.5"]["by_seed"][0]["epochs_run"] == 3
    assert by_fraction["1.0"]["by_seed"][0]["epochs_run"] == 1
    assert len(by_fraction["0.5"]["by_seed"][0]["val_top1_by_epoch"]) == 3
    report = (result.run_dir / "report.md").read_text()
    assert "50% labels (class-balanced, seeded; 3 epochs):" in report
    assert "100% labels (1 epoch):" in report


def test_validated_epochs_are_evenly_spaced_and_end_with_the_last():
    assert validated_epochs(30, 10) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert validated_epochs(10, 4) == [3, 5, 8, 10]
    assert validated_epochs(5, 1) == [5]
    assert validated_epochs(3, 10) == validated_epochs(3, None) == [1, 2, 3]


@pytest.mark.slow
def test_finetuning_validates_only_the_epochs_asked_for(tiny_overrides, tmp_path):
    """`eval.finetune.validations`: each run validates that many of its epochs, the best of
    them reported; results, report.md and metrics.jsonl say which."""
    overrides = [*tiny_overrides, "pretrain.epochs=1", "stages=[pretrain, finetune]",
                 "eval.finetune.label_fractions=[0.5, 1.0]", "eval.finetune.epochs={0.5: 5, 1.0: 2}",
                 "eval.finetune.validations=2", "eval.seeds=1", "eval.baselines=[]",
                 f"eval.cache_dir={tmp_path / 'cache'}"]
    result = ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=tmp_path / "run", quiet=True)
    by_fraction = json.loads((result.run_dir / "results.json").read_text())["finetune"]["by_fraction"]
    half, whole = by_fraction["0.5"], by_fraction["1.0"]
    assert (half["validated_epochs"], whole["validated_epochs"]) == (2, 2)
    history = half["by_seed"][0]["val_top1_by_epoch"]
    assert [score is not None for score in history] == [False, False, True, False, True]  # 3 and 5
    assert half["by_seed"][0]["best_epoch"] in (3, 5) and half["by_seed"][0]["epochs_run"] == 5
    assert all(score is not None for score in whole["by_seed"][0]["val_top1_by_epoch"])
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    logged: dict[str, list[int]] = {}  # each grid pair's run: the epochs (0-based) it validated
    for r in records:
        if "finetune/val_top1" in r and r["stage"].startswith("finetune/backbone/0.5"):
            logged.setdefault(r["stage"], []).append(r["epoch"])
    assert logged and all(epochs == [2, 4] for epochs in logged.values()), logged
    report = (result.run_dir / "report.md").read_text()
    assert "50% labels (class-balanced, seeded; 5 epochs, best of 2 validated):" in report
    assert "100% labels (2 epochs):" in report


def test_finetune_epochs_per_fraction_are_checked(capsys):
    """A mapping names every label fraction run, with positive epochs: one clear line. Entries
    for other fractions are allowed: a misspelt fraction leaves the intended one missing."""
    fractions = "eval.finetune.label_fractions=[0.1, 1.0]"
    for bad, key, why in [("{0.1: 30}", "eval.finetune:", "no entry for label fraction(s) [1.0]"),
                          ("{0.1: 30, 0.001: 10}", "eval.finetune:", "no entry for label fraction(s) [1.0]"),
                          ("{0.1: 0, 1.0: 10}", "eval.finetune.epochs.0.1:", "greater than or equal to 1"),
                          ("0", "eval.finetune.epochs:", "greater than or equal to 1")]:
        code = main(["validate", str(QUICKSTART), "--set", fractions, "--set", f"eval.finetune.epochs={bad}"])
        err = capsys.readouterr().err
        assert code == 2 and f"{key} " in err and why in err, err
        assert len(err.strip().splitlines()) == 1 and "constrained" not in err and "dict[" not in err, err
    assert main(["validate", str(QUICKSTART), "--set", fractions,
                 "--set", "eval.finetune.epochs={0.1: 30, 1.0: 10}"]) == 0
    # an ImageNet recipe's {0.01: 60, 0.1: 30} with only the 10% runs asked for
    assert main(["validate", str(QUICKSTART), "--set", "eval.finetune.label_fractions=[0.1]",
                 "--set", "eval.finetune.epochs={0.01: 60, 0.1: 30}"]) == 0


def test_chosen_settings_name_each_seeds_choice_when_they_differ():
    grid = [{"lr": 0.01, "backbone_lr_ratio": 0.1}]  # present: the runs chose from a grid
    same = [{"lr": 0.01, "backbone_lr_ratio": 1.0, "grid": grid}] * 2
    assert evaluation.chosen_settings(same) == {"chosen": {"lr": 0.01, "backbone_lr_ratio": 1.0}}
    differ = [{"lr": 0.01, "backbone_lr_ratio": r, "grid": grid} for r in (0.1, 1.0, 0.1)]
    assert evaluation.chosen_settings(differ) == {
        "chosen": {"lr": 0.01, "backbone_lr_ratio": [0.1, 1.0, 0.1]}}
    assert evaluation.chosen_settings([{"lr": 0.01, "backbone_lr_ratio": 0.1}]) == {}  # no grid


@pytest.mark.slow
def test_a_finetune_stage_killed_part_way_resumes_without_redoing_finished_runs(tiny_overrides, tmp_path,
                                                                                monkeypatch):
    """Each fine-tuning run's result is kept as it finishes; `--resume` after a crash in the
    stage redoes only the unfinished run and the ones after it, and the kept results are used."""
    real_fit = evaluation.fit_finetuner
    calls = {"n": 0, "crash_at": 5}

    def fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise RuntimeError("simulated crash in the middle of the fine-tuning stage")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(evaluation, "fit_finetuner", fit)
    overrides = [*tiny_overrides, "pretrain.epochs=1", "stages=[pretrain, finetune]", "eval.seeds=2",
                 "eval.finetune.epochs=1", "eval.finetune.label_fractions=[0.5, 1.0]",
                 "eval.finetune.backbone_lr_ratio=[0.1, 1.0]", "eval.baselines=[random_init]",
                 "eval.reuse_baselines=false", f"eval.cache_dir={tmp_path / 'cache'}"]
    out = tmp_path / "run"
    # backbone: fraction 0.5 seeds 0 and 1, fraction 1.0 seed 0, two pairs each: fits 1-6; the
    # crash is in the third run (fit 5), after two runs finished
    with pytest.raises(Exception, match="simulated crash"):
        ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=out, quiet=True)
    kept = sorted(p.relative_to(out / "runs").as_posix() for p in (out / "runs").rglob("*.json"))
    assert kept == ["finetune/backbone/0.5/seed0.json", "finetune/backbone/0.5/seed1.json"]
    first = json.loads((out / "runs/finetune/backbone/0.5/seed1.json").read_text())["result"]

    calls.update(n=0, crash_at=-1)
    ssl_pipeline.run(resume=out, quiet=True)
    assert calls["n"] == 2 + 6  # the backbone's unfinished run (2 pairs), then random init's 3 runs
    results = json.loads((out / "results.json").read_text())
    assert results["finetune"]["by_fraction"]["0.5"]["by_seed"][1] == first
    assert "finetune" in results["baselines"]["random_init"]


@pytest.mark.slow
def test_a_finetuning_run_killed_mid_run_goes_on_from_its_last_epoch(tiny_overrides, tmp_path,
                                                                    monkeypatch):
    """Within a run, `--resume` goes on from the last finished epoch's checkpoint (kept under
    runs/<name>.partial/ until the run's result is kept) instead of starting the run over."""
    real_fit = evaluation.fit_finetuner
    this_calls = []

    class CrashAt(pl.Callback):  # after epoch 3's step and validation are logged, before its checkpoint
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                raise RuntimeError("simulated crash in epoch 3")

    def fit(*args, **kwargs):
        trainer_kwargs = dict(args[5])
        if not this_calls:  # the first run dies in its third epoch
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), CrashAt()]
            this_calls.append(None)
        model, info = real_fit(*args[:5], trainer_kwargs, *args[6:], **kwargs)
        this_calls.append(info["this_call"]["epochs"])
        return model, info

    monkeypatch.setattr(evaluation, "fit_finetuner", fit)
    overrides = [*tiny_overrides, "pretrain.epochs=1", "stages=[pretrain, finetune]",
                 "eval.finetune.epochs=4", "eval.finetune.label_fractions=[1.0]", "eval.baselines=[]",
                 "eval.checkpoint_minutes=0"]  # every epoch
    out = tmp_path / "run"
    with pytest.raises(Exception, match="simulated crash"):
        ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=out, quiet=True)
    scratch = out / "runs/finetune/backbone/1.0/seed0.partial"
    assert (scratch / "setting0.ckpt").is_file() and (scratch / "key").is_file()

    ssl_pipeline.run(resume=out, quiet=True)
    assert this_calls == [None, 2, 4]  # the first setting's epochs 3 and 4 only; the second's 4
    run = json.loads((out / "results.json").read_text())["finetune"]["by_fraction"]["1.0"]["by_seed"][0]
    assert run["epochs_run"] == 4 and len(run["val_top1_by_epoch"]) == 4
    assert not scratch.exists()  # removed once the run's result is kept
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    epochs = [r["epoch"] for r in records if r.get("stage") == "finetune/backbone/1.0/seed0/lr0.01_ratio0.1"
              and "finetune/val_top1" in r]
    assert epochs == [0, 1, 2, 3]  # each epoch's validation logged once
    steps = [r["step"] for r in records if r.get("stage") == "finetune/backbone/1.0/seed0/lr0.01_ratio0.1"
             and "finetune/loss_step" in r]
    assert steps == sorted(set(steps))  # no training step logged twice


@pytest.mark.slow
def test_full_data_finetuning_repeats_over_its_own_seeds(tiny_overrides, tmp_path):
    """`finetune.full_data_seeds` runs 100% of the labels that many times (the seed draws the
    head's init, the batch order and the augmentations) and reports their mean and std."""
    overrides = [*tiny_overrides, "pretrain.epochs=1", "stages=[pretrain, finetune]", "eval.baselines=[]",
                 "eval.finetune.epochs=2", "eval.finetune.label_fractions=[1.0]",
                 "eval.finetune.backbone_lr_ratio=0.1", "eval.finetune.full_data_seeds=2"]
    result = ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=tmp_path / "run", quiet=True)
    full = result.results["finetune"]["by_fraction"]["1.0"]
    assert full["seeds"] == 2 and [r["seed"] for r in full["by_seed"]] == [0, 1]
    histories = [r["val_top1_by_epoch"] for r in full["by_seed"]]
    losses = {}
    for line in (result.run_dir / "metrics.jsonl").open():
        record = json.loads(line)
        if "finetune/loss_step" in record:
            losses.setdefault(record["stage"], []).append(record["finetune/loss_step"])
    assert set(losses) == {"finetune/backbone/1.0/seed0", "finetune/backbone/1.0/seed1"}
    assert losses["finetune/backbone/1.0/seed0"] != losses["finetune/backbone/1.0/seed1"]  # other draws
    top1 = [r["top1"] for r in full["by_seed"]]
    assert full["top1"] == pytest.approx(np.mean(top1)) and full["top1_std"] == pytest.approx(np.std(top1, ddof=1))
    assert all(len(h) == 2 for h in histories)


def test_the_probe_trains_where_the_evaluation_computes(tiny_overrides, tmp_path, monkeypatch):
    """The pipeline hands the linear probe the run's evaluation device (a GPU run's GPU)."""
    from types import SimpleNamespace

    gpu_run = SimpleNamespace(resolved=SimpleNamespace(accelerator="gpu"))
    assert evaluation.eval_device(gpu_run) == "cuda"
    seen = []
    real = evaluation.linear_probe

    def probe(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "linear_probe", probe)
    monkeypatch.setattr(evaluation, "eval_device", lambda ctx: "cpu:0")  # stands for "cuda"
    ssl_pipeline.run(QUICKSTART, overrides=[*tiny_overrides, "pretrain.epochs=1", "eval.seeds=1",
                                            "eval.linear_probe.epochs=2", "stages=[pretrain, linear_probe]",
                                            "eval.baselines=[]"], out_dir=tmp_path / "run", quiet=True)
    assert seen == ["cpu:0"]
