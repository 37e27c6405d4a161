"""Suites: variants of one base recipe, run in turn, compared in one report, resumable."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_pipeline.cli import main
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.recipe import apply_overrides, load_recipe
from ssl_pipeline.suite import is_suite_file, load_suite, run_suite, variant_recipes

ROOT = Path(__file__).parents[1]
SUITES = sorted(p for p in ROOT.joinpath("recipes").glob("*.yaml") if is_suite_file(p))
# Evaluation kept to seconds on the tiny fake data of conftest.TINY.
TINY_EVAL = [
    "stages=[pretrain, knn, linear_probe]",
    "pretrain.epochs=1",
    "eval.linear_probe.epochs=5",
    "eval.seeds=2",
]


@pytest.fixture
def tiny_base(tiny_overrides, tmp_path) -> dict:
    return apply_overrides({}, [*tiny_overrides, *TINY_EVAL, f"eval.cache_dir={tmp_path / 'cache'}"])


def write_suite(path: Path, base, variants: dict, **extra) -> Path:
    path.write_text(yaml.safe_dump({"suite": {"base": base, "variants": variants, **extra}},
                                   sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished_suite(tmp_path_factory):
    """Three variants, one of which fails in pretraining, run once for the module."""
    from conftest import TINY

    tmp = tmp_path_factory.mktemp("suite")
    base = apply_overrides({}, [*TINY, *TINY_EVAL, f"eval.cache_dir={tmp / 'cache'}"])
    path = write_suite(tmp / "tiny.yaml", base, {
        "simclr": {},
        "supervised": {"method.name": "supervised"},
        "broken": {"pretrain": {"batch_size": 1000}},  # more than the 48 images: fails in the stage
    })
    with pytest.MonkeyPatch.context() as env:  # module scope: conftest's autouse one is per test
        env.setenv("WANDB_MODE", "disabled")
        env.delenv("SSL_PIPELINE_RUN_DIR", raising=False)
        return run_suite(path, out_dir=tmp / "out", quiet=True)


# ---------------------------------------------------------------- the schema


def test_unknown_key_in_a_variant_names_the_variant_and_the_nearest_key(tmp_path, tiny_base):
    path = write_suite(tmp_path / "s.yaml", tiny_base, {"ok": {}, "typo": {"pretrain.lrr": 0.1}})
    with pytest.raises(SSLPipelineError) as info:
        variant_recipes(load_suite(path), source=str(path))
    message = str(info.value)
    assert "variant 'typo'" in message and "'pretrain.lrr'" in message
    assert "did you mean 'pretrain.lr'" in message and "variant 'ok'" not in message


def test_unknown_suite_key_names_the_nearest_suite_key(tmp_path, tiny_base):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"suite": {"base": tiny_base, "variant": {"a": {}}}}))
    with pytest.raises(SSLPipelineError, match=r"unknown key 'suite.variant'; did you mean 'suite.variants'"):
        load_suite(path)


def test_variants_merge_nested_blocks_and_dotted_keys_then_seeds_and_overrides(tmp_path, tiny_base):
    path = write_suite(tmp_path / "s.yaml", tiny_base, {
        "nested": {"method": {"name": "simsiam"}, "views": {"blur_prob": 0.0}},
        "dotted": {"method.name": "supervised", "pretrain.lr": 0.5},
    }, seeds=[3, 4], overrides=["pretrain.epochs=7"])
    recipes = variant_recipes(load_suite(path))
    assert list(recipes) == ["nested-seed3", "nested-seed4", "dotted-seed3", "dotted-seed4"]
    nested, dotted = recipes["nested-seed4"], recipes["dotted-seed3"]
    assert (nested.method.name, nested.views.blur_prob, nested.seed) == ("simsiam", 0.0, 4)
    assert nested.data.name == "fake" and nested.data.fake.train_samples == 48  # base kept
    assert (dotted.method.name, dotted.pretrain.lr, dotted.seed) == ("supervised", 0.5, 3)
    assert all(r.pretrain.epochs == 7 for r in recipes.values())


def test_a_named_block_given_by_its_name_alone_merges_as_its_name(tmp_path, tiny_base):
    base = {**tiny_base, "method": {**tiny_base.get("method", {}), "name": "simclr",
                                    "simsiam": {"projection_dim": 64}}}
    path = write_suite(tmp_path / "s.yaml", base, {
        "simsiam": {"method": "simsiam"},  # sets the name: the base's simsiam block stays
    })
    recipes = variant_recipes(load_suite(path))
    assert (recipes["simsiam"].method.name, recipes["simsiam"].method.simsiam.projection_dim) == ("simsiam", 64)
    # a base that names its method alone keeps that name when a variant sets one of its keys
    path = write_suite(tmp_path / "t.yaml", {**tiny_base, "method": "simsiam"},
                       {"small_head": {"method.simsiam.projection_dim": 32}})
    recipe = variant_recipes(load_suite(path))["small_head"]
    assert (recipe.method.name, recipe.method.simsiam.projection_dim) == ("simsiam", 32)


def test_base_recipe_file_is_read_relative_to_the_suite(tmp_path, tiny_base):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.yaml").write_text(yaml.safe_dump(tiny_base))
    path = write_suite(tmp_path / "recipes" / "s.yaml", "base.yaml", {"a": {"seed": 5}})
    assert variant_recipes(load_suite(path))["a"].seed == 5


def test_validate_checks_every_variant(tmp_path, tiny_base, capsys):
    good = write_suite(tmp_path / "good.yaml", tiny_base,
                       {"a": {}, "b": {"method.name": "simsiam"}})
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid suite, 2 variants" in out and "b: method simsiam" in out

    bad = write_suite(tmp_path / "bad.yaml", tiny_base,
                      {"a": {"pretrain.epochs": -1}, "b": {}, "c": {"method.name": "simclrr"}})
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "variant 'a'" in err and "pretrain.epochs" in err
    assert "variant 'c'" in err and "did you mean 'simclr'" in err and "variant 'b'" not in err


def test_a_suite_file_is_not_taken_for_a_recipe(tmp_path, tiny_base):
    path = write_suite(tmp_path / "s.yaml", tiny_base, {"a": {}})
    with pytest.raises(SSLPipelineError, match="is a suite"):
        load_recipe(path)


@pytest.mark.parametrize("path", SUITES, ids=[p.name for p in SUITES])
def test_every_suite_in_recipes_validates(path):
    recipes = variant_recipes(load_suite(path), source=str(path))
    assert recipes and all(r.data.name for r in recipes.values())


@pytest.mark.slow  # 5 suites, 21 variants: a few minutes; validation above is in the default tier
@pytest.mark.parametrize("path", SUITES, ids=[p.name for p in SUITES])
def test_every_suite_in_recipes_runs_end_to_end_on_tiny_fake_data(path, tmp_path, tiny_overrides):
    cheap = [*tiny_overrides, "pretrain.epochs=1", f"eval.cache_dir={tmp_path / 'cache'}",
             "eval.seeds=2", "eval.linear_probe.epochs=5", "eval.finetune.epochs=1",
             "eval.finetune.label_fractions=[0.5, 1.0]", "eval.few_shot.seeds=2",
             "eval.few_shot.shots=[1]"]
    result = run_suite(path, overrides=cheap, out_dir=tmp_path / "out", quiet=True)
    assert result.failed == []
    assert (tmp_path / "out" / "comparison.md").is_file()


# ---------------------------------------------------------------- running


@pytest.mark.slow
def test_suite_run_writes_variant_dirs_comparison_and_a_small_summary(finished_suite):
    out = finished_suite.out_dir
    for name in ("simclr", "supervised"):
        state = json.loads((out / name / "run_state.json").read_text())["stages"]
        assert all(state[s]["status"] == "done" for s in ("pretrain", "knn", "linear_probe"))
    for name in ("comparison.md", "comparison.html", "comparison.json", "suite.yaml"):
        assert (out / name).is_file(), name

    text = (out / "suite_results.json").read_text()
    assert len(text) < 20_000  # committable: no per-class tables, matrices or per-seed lists
    assert "confusion_matrix" not in text and "per_class" not in text and "by_seed" not in text
    summary = json.loads(text)
    assert summary["finished"] is False  # one variant failed
    simclr = summary["variants"]["simclr"]
    assert (simclr["status"], simclr["method"], simclr["seed"], simclr["run_dir"]) == \
        ("done", "simclr", 0, "simclr")
    probe = simclr["stages"]["linear_probe"]
    assert probe["status"] == "done" and probe["seeds"] == 2 and 0 <= probe["top1"] <= 1
    assert "top1_std" in probe and simclr["stages"]["pretrain"]["stopped_by_budget"] is False
    assert simclr["baselines"]["random_init"]["knn"]["top1"] is not None
    assert summary["variants"]["supervised"]["method"] == "supervised"
    # per-epoch curves, for ablation plots: the monitor's k-NN, and the head's val accuracy
    # for the supervised variant only
    curve = simclr["curve"]
    assert curve["epoch"] == [1] and curve["seconds"][0] > 0 and len(curve["loss"]) == 1
    assert 0 <= curve["knn_top1"][0] <= 1 and "val_accuracy" not in curve
    assert 0 <= summary["variants"]["supervised"]["curve"]["val_accuracy"][0] <= 1
    assert "curve" not in summary["variants"]["broken"]
    assert "## Pretraining curves" in (out / "comparison.md").read_text()
    assert (out / "plots" / "curves.png").is_file()


def test_a_failing_variant_is_reported_and_the_others_finish(finished_suite):
    out = finished_suite.out_dir
    assert finished_suite.failed == ["broken"]
    broken = json.loads((out / "suite_results.json").read_text())["variants"]["broken"]
    assert broken["status"] == "failed" and "larger than the" in broken["error"]
    assert "Traceback" in (out / "broken" / "error.log").read_text()
    rows = {row["label"]: row for row in json.loads((out / "comparison.json").read_text())["rows"]}
    assert rows["broken"]["status"] == "failed" and "larger than the" in rows["broken"]["error"]
    assert rows["simclr"]["status"] == "done" and rows["supervised"]["status"] == "done"
    assert "broken" in (out / "comparison.md").read_text()


def test_resume_skips_finished_variants_and_resumes_the_rest_per_stage(finished_suite, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(finished_suite.out_dir, out)
    # an interrupted variant: its probe never finished
    state_path = out / "supervised" / "run_state.json"
    state = json.loads(state_path.read_text())
    del state["stages"]["linear_probe"]
    state_path.write_text(json.dumps(state))
    watched = (out / "simclr" / "results.json", out / "supervised" / "backbone.safetensors",
               out / "supervised" / "results.json")
    before = [p.stat().st_mtime_ns for p in watched]

    again = run_suite(resume=out, quiet=False)
    printed = capsys.readouterr().out
    assert "variant simclr (1/3): already done, skipped" in printed
    assert "variant supervised (2/3): resuming" in printed
    assert "stage pretrain: already done, skipped" in printed  # supervised: only the probe reran
    after = [p.stat().st_mtime_ns for p in watched]
    assert after[0] == before[0]  # simclr: nothing rewritten
    assert after[1] == before[1] and after[2] != before[2]  # supervised: the probe only
    assert again.failed == ["broken"]  # retried, and it fails again
    assert json.loads(state_path.read_text())["stages"]["linear_probe"]["status"] == "done"


def test_an_out_dir_holding_a_suite_is_refused(finished_suite):
    with pytest.raises(SSLPipelineError, match="already holds a suite.*--resume"):
        run_suite(finished_suite.out_dir / "suite.yaml", out_dir=finished_suite.out_dir)


def test_max_minutes_ends_each_stage_and_is_recorded(tmp_path, tiny_base):
    base = apply_overrides(tiny_base, [
        "stages=[pretrain, linear_probe, few_shot, finetune]",
        "eval.baselines=[]",
        "pretrain.epochs=500", "pretrain.max_minutes=0.002",  # 0.12 s: ends in epoch 1 or 2
        "eval.linear_probe.epochs=5000", "eval.linear_probe.max_minutes=0.0005",
        "eval.few_shot.shots=[1, 2, 3]", "eval.few_shot.seeds=50", "eval.few_shot.max_minutes=0.0005",
        "eval.finetune.epochs=50", "eval.finetune.max_minutes=0.0005",
        "eval.finetune.label_fractions=[1.0]",
    ])
    path = write_suite(tmp_path / "s.yaml", base, {"budget": {}})
    result = run_suite(path, out_dir=tmp_path / "out", quiet=True)
    assert result.failed == []
    stages = result.variants["budget"]["stages"]
    assert stages["pretrain"]["stopped_by_budget"] is True and stages["pretrain"]["epochs"] < 500
    assert stages["linear_probe"]["stopped_by_budget"] is True and stages["linear_probe"]["seeds"] == 1
    shots = stages["few_shot"]["by_shots"]
    assert stages["few_shot"]["stopped_by_budget"] is True
    assert sum(s["n"] for s in shots.values()) < 150  # not every draw ran
    assert stages["finetune"]["stopped_by_budget"] is True
    results = json.loads((tmp_path / "out" / "budget" / "results.json").read_text())
    assert results["finetune"]["by_fraction"]["1.0"]["by_seed"][0]["epochs_run"] < 50


# ---------------------------------------------------------------- the command line


@pytest.mark.slow
def test_cli_runs_a_suite_then_resumes_it(tmp_path, tiny_base):
    path = write_suite(tmp_path / "s.yaml", tiny_base,
                       {"simclr": {}, "simsiam": {"method.name": "simsiam"}})
    exe = Path(sys.executable).with_name("ssl-pipeline")
    env = {**os.environ, "WANDB_MODE": "disabled"}

    def cli(*args):
        return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=1800)

    first = cli("run", str(path), "--out", str(tmp_path / "out"))
    assert first.returncode == 0, first.stderr
    assert "simclr: done" in first.stdout and "simsiam: done" in first.stdout
    assert (tmp_path / "out" / "comparison.html").is_file()
    again = cli("run", "--resume", str(tmp_path / "out"))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already done, skipped") == 2
