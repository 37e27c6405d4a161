"""tracking.py: metrics.jsonl always; W&B per stage in one group, resumable, never leaking the
API key, and never costing the run when it cannot start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY
from wandb_offline import offline_runs

import ssl_pipeline
from ssl_pipeline.recipe import WandbConfig
from ssl_pipeline.tracking import WandbTracker, stage_metrics, wandb_settings

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
CANARY = "canary" + "0123456789abcdef" * 2 + "feedbeef12"  # 40 characters, like a real key
NO_TRACKING = [o for o in TINY if not o.startswith("tracking")]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A tiny run through the CLI, as a user runs it: W&B offline (the recipe's default), a
    canary API key in the environment, output captured."""
    out = tmp_path_factory.mktemp("tracking") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"WANDB_API_KEY": CANARY, "PYTHONUNBUFFERED": "1"}
    sets = [a for o in [*NO_TRACKING, "stages=[pretrain, knn]"] for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_pipeline.cli", "run", str(QUICKSTART), "--out", str(out), *sets],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def _by_job(run_dir: Path) -> dict:
    return {r.job_type: r for r in offline_runs(run_dir)}


@pytest.mark.slow
def test_one_offline_wandb_run_per_stage_in_one_group(offline_run):
    run_dir, _ = offline_run
    runs = _by_job(run_dir)
    assert set(runs) == {"pretrain", "knn", "report"}
    assert {r.group for r in runs.values()} == {f"{run_dir.parent.name}/{run_dir.name}"}
    ids = json.loads((run_dir / "wandb_runs.json").read_text())
    assert {job: r.run_id for job, r in runs.items()} == ids  # stored, so a resume continues them
    assert runs["pretrain"].config["resolved"]["world_size"] == 1  # the resolved recipe as config


def test_wandb_holds_the_metrics(offline_run):
    run_dir, _ = offline_run
    runs = _by_job(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    local_losses = [r["train/loss_step"] for r in rows if "train/loss_step" in r]
    wandb_losses = [h["train/loss_step"] for h in runs["pretrain"].history if "train/loss_step" in h]
    assert wandb_losses == pytest.approx(local_losses) and len(local_losses) >= 4
    knn = runs["knn"].summary
    assert knn["knn/top1"] == pytest.approx(results["knn"]["top1"])
    assert knn["baselines/random_init/knn/top1"] == pytest.approx(
        results["baselines"]["random_init"]["knn"]["top1"])
    table = [k for h in runs["knn"].history for k in h if k.startswith("knn/per_class")]
    assert "knn/per_class/_type" in table  # per-class results as a W&B table
    assert runs["pretrain"].summary["pretrain/steps"] == results["pretrain"]["steps"]


def test_wandb_has_the_plots_and_the_backbone_artifact(offline_run):
    run_dir, _ = offline_run
    runs = _by_job(run_dir)
    plots = sorted(p.stem for p in (run_dir / "plots").glob("*.png"))
    logged = sorted(Path(f).name.split("_0_")[0] for f in runs["report"].files if f.endswith(".png"))
    assert plots and logged == plots
    assert any(name.startswith("backbone-") for name in runs["pretrain"].artifacts)
    nrows = [h["results/nrows"] for h in runs["report"].history if "results/nrows" in h]
    assert nrows and nrows[0] >= 3  # the results table: backbone, random init, raw pixels


def test_metrics_jsonl_holds_every_evaluation(offline_run):
    run_dir, _ = offline_run
    results = json.loads((run_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    done = {r["stage"]: r for r in rows if r.get("event") == "stage_result"}
    assert set(done) == {"pretrain", "knn"}
    assert done["knn"]["knn/top1"] == results["knn"]["top1"]
    assert done["knn"]["knn/by_k/200/top1"] == results["knn"]["by_k"]["200"]["top1"]
    assert done["pretrain"]["pretrain/epochs"] == 2


def test_api_key_never_written_or_printed(offline_run):
    run_dir, output = offline_run
    assert "wandb sync" in output  # the W&B line was printed, and the output captured
    assert "anonymous setting" not in output  # wandb's warning about an option we never set
    assert CANARY not in output
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert leaked == []
    assert len(list((run_dir / "wandb").rglob("*"))) > 10  # the scan did cover W&B's files


def test_terminal_gets_one_wandb_line_instead_of_wandbs_own_output(offline_run):
    run_dir, output = offline_run
    lines = output.splitlines()
    # wandb's headers, history and summary (about 25 lines per stage) are silenced
    assert [line for line in lines if line.startswith("wandb:")] == []
    ours = [line for line in lines if "W&B" in line]
    expected = (f"  W&B offline: runs saved under {run_dir / 'wandb'}; upload them later with: "
                f"wandb sync {run_dir / 'wandb'}/offline-run-*")
    assert ours == [expected]
    assert lines.index(ours[0]) == lines.index("stage pretrain: running") + 1
    assert any(line.startswith("  epoch 1/") for line in lines)  # the run's own output stays


def test_online_stages_print_their_run_address_and_quiet_prints_nothing(tmp_path, capsys):
    run = SimpleNamespace(url="https://wandb.ai/team/proj/runs/abc123")
    tracker = WandbTracker(WandbConfig(mode="online"), tmp_path, "r/1", {})
    tracker.settings["mode"] = "online"  # whatever WANDB_MODE the test session sets
    tracker._announce("pretrain", run)
    tracker._announce("knn", SimpleNamespace(url="https://wandb.ai/team/proj/runs/def456"))
    assert capsys.readouterr().out.splitlines() == [
        "  W&B pretrain: https://wandb.ai/team/proj/runs/abc123",
        "  W&B knn: https://wandb.ai/team/proj/runs/def456"]
    quiet = WandbTracker(WandbConfig(mode="online"), tmp_path, "r/1", {}, quiet=True)
    quiet.settings["mode"] = "online"
    quiet._announce("pretrain", run)
    offline = WandbTracker(WandbConfig(mode="offline"), tmp_path, "r/1", {}, quiet=True)
    offline.settings["mode"] = "offline"
    offline._announce("pretrain", run)
    assert capsys.readouterr().out == ""


def test_environment_overrides_the_recipe(monkeypatch):
    config = WandbConfig(mode="offline", project="from-recipe", group="g", tags=["a"])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_TAGS", "x,y")
    settings = wandb_settings(config)
    assert settings["mode"] == "disabled" and settings["project"] == "from-env"
    assert settings["tags"] == ["x", "y"] and settings["group"] == "g"
    assert not WandbTracker(config, Path("unused"), "r/1", {}).enabled
    monkeypatch.delenv("WANDB_MODE")
    assert WandbTracker(config, Path("unused"), "r/1", {}).enabled
    assert not WandbTracker(config, Path("unused"), "r/1", {}, active=False).enabled  # rank > 0


def test_init_kwargs_name_group_and_stored_id(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    tracker = WandbTracker(WandbConfig(name="mine", entity="team"), tmp_path, "quick/2026", {"a": 1})
    first = tracker.init_kwargs("knn")
    assert first["group"] == "quick/2026" and first["name"] == "mine/knn"
    assert first["job_type"] == "knn" and first["entity"] == "team" and first["mode"] == "offline"
    again = WandbTracker(WandbConfig(), tmp_path, "quick/2026", {}).init_kwargs("knn")
    assert again["id"] == first["id"] and again["resume"] == "allow"
    assert WandbTracker(WandbConfig(), tmp_path, "quick/2026", {}).init_kwargs("report")["id"] != first["id"]


def test_stage_metrics_flattens_numbers_only():
    result = {"top1": 0.9, "by_k": {"20": {"top1": 0.9}}, "confusion_matrix": [[1]], "k": 20,
              "chosen": {"lr": 0.1, "solver": "sgd"}}
    flat = stage_metrics("knn", result, {"raw_pixels": {"knn": {"top1": 0.8}}})
    assert flat == {"knn/top1": 0.9, "knn/by_k/20/top1": 0.9, "knn/k": 20, "knn/chosen/lr": 0.1,
                    "baselines/raw_pixels/knn/top1": 0.8}


@pytest.mark.slow
def test_resumed_stage_continues_its_wandb_run(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", CANARY)
    first = ssl_pipeline.run(QUICKSTART, overrides=[*NO_TRACKING, "tracking.wandb.mode=offline"],
                             out_dir=tmp_path / "run", quiet=True)
    state_path = first.run_dir / "run_state.json"
    state = json.loads(state_path.read_text())
    del state["stages"]["pretrain"]  # as if killed before pretraining was marked done
    state_path.write_text(json.dumps(state))
    ssl_pipeline.run(resume=first.run_dir, quiet=True)
    pretrain = [r for r in offline_runs(first.run_dir) if r.job_type == "pretrain"]
    assert len(pretrain) == 2
    assert pretrain[0].run_id == pretrain[1].run_id
    assert pretrain[0].run_id == json.loads((first.run_dir / "wandb_runs.json").read_text())["pretrain"]
    out, err = capfd.readouterr()  # the key reaches neither the output nor any file of the run
    assert CANARY not in out + err
    assert not [p for p in first.run_dir.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]


@pytest.mark.slow
def test_unreachable_wandb_logs_offline_for_a_later_sync_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                             capfd):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", CANARY)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ssl_pipeline.run(QUICKSTART, out_dir=tmp_path / "run", quiet=True, overrides=[
            *NO_TRACKING, "tracking.wandb.mode=online", "stages=[pretrain, knn]"])
    ours = [str(w.message) for w in caught if "W&B" in str(w.message)]
    assert len(ours) == 1 and "cannot reach 127.0.0.1:9" in ours[0], ours
    assert f"wandb sync {result.run_dir / 'wandb'}/offline-run-*" in ours[0]
    assert result.results["knn"]["top1"] > 0  # the run finished, with local results
    rows = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert any('"stage_result"' in r and '"knn"' in r for r in rows)
    assert (result.run_dir / "report.html").exists()
    # every stage's W&B run was written offline, ready for `wandb sync`
    runs = {r.job_type: r for r in offline_runs(result.run_dir)}
    assert {"pretrain", "knn", "report"} <= set(runs)
    assert runs["knn"].summary["knn/top1"] == pytest.approx(result.results["knn"]["top1"])
    out, err = capfd.readouterr()
    assert CANARY not in out + err + str(ours)
    assert not [p for p in result.run_dir.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]


def test_per_class_table_finds_each_stage_s_metrics():
    from ssl_pipeline.tracking import per_class_table

    metrics = {"per_class_accuracy": [0.5, 1.0], "class_names": ["a", "b"]}
    finetune = {"top1": 0.7, "by_fraction": {"1.0": {"top1": 0.7, "by_seed": [{"seed": 0, **metrics}]}}}
    probe = {"top1": 0.8, "test_metrics": metrics}
    assert per_class_table("finetune", finetune, {}) == [
        {"subject": "backbone", "class": "a", "accuracy": 0.5},
        {"subject": "backbone", "class": "b", "accuracy": 1.0}]
    rows = per_class_table("linear_probe", probe, {"raw_pixels": {"linear_probe": probe}})
    assert [r["subject"] for r in rows] == ["backbone", "backbone", "raw_pixels", "raw_pixels"]
    assert per_class_table("knn", {"top1": 0.9}, {}) == []
