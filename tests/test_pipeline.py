"""End to end through the Python API on tiny synthetic data: run directory, export, resume."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml

import ssl_pipeline
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.methods import methods
from ssl_pipeline.suite import is_suite_file

# suite files are recipes of recipes: tests/test_suite.py validates and runs those; transfer
# recipes evaluate a given backbone: tests/test_medmnist.py and test_eurosat.py run those; the
# imagenet* recipes run end to end, as written, on a miniature ILSVRC folder in test_imagenet.py
RECIPES = sorted(p for p in Path(__file__).parents[1].joinpath("recipes").glob("*.yaml")
                 if not is_suite_file(p) and not p.name.startswith(("transfer_", "imagenet")))


def run_tiny(tmp_path, tiny_overrides, *extra, recipe="recipes/quickstart.yaml"):
    recipe = Path(__file__).parents[1] / recipe
    return ssl_pipeline.run(recipe, overrides=[*tiny_overrides, *extra], out_dir=tmp_path / "run",
                            quiet=True)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_runs_end_to_end_on_tiny_fake_data(tmp_path, tiny_overrides, path):
    # the recipe's own evaluation, shortened: one seed, one epoch of each trained evaluation
    # (and no worker processes: the ImageNet recipes ask for 10 per GPU)
    short_eval = ["eval.seeds=1", "eval.finetune.epochs=1", "eval.linear_probe_classic.epochs=1",
                  "eval.linear_probe.epochs=5", "data.num_workers=0"]
    result = run_tiny(tmp_path, [*tiny_overrides, *short_eval], recipe=path)
    assert (result.run_dir / "backbone.safetensors").is_file()
    assert result.results["pretrain"]["steps"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.names())
def test_each_method_runs_and_leaves_a_complete_run_directory(tmp_path, tiny_overrides, method):
    result = run_tiny(tmp_path, tiny_overrides, f"method.name={method}")
    run_dir = result.run_dir
    for name in ("recipe.yaml", "metrics.jsonl", "results.json", "backbone.safetensors",
                 "backbone.json", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name

    recorded = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recorded["method"]["name"] == method
    resolved = recorded["resolved"]
    assert resolved["per_device_batch_size"] == 16 and resolved["world_size"] == 1
    assert resolved["effective_lr"] == pytest.approx(0.02)  # quickstart: lr_scaling none
    assert resolved["data"]["channels"] == 3 and resolved["data"]["image_size"] == 16
    assert set(resolved["data"]["split_hashes"]) == {"train", "val", "test"}

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_step" in line for line in lines)
    assert any("monitor/knn_top1" in line for line in lines)

    meta = json.loads((run_dir / "backbone.json").read_text())
    assert meta["method"] == method and meta["feature_dim"] == 512 and meta["in_chans"] == 3
    assert "torch" in meta["packages"]

    backbone = ssl_pipeline.load_backbone(run_dir)
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    trained = {k.removeprefix("backbone.model."): v for k, v in ckpt["state_dict"].items()
               if k.startswith("backbone.model.")}
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.slow
def test_export_best_uses_the_best_monitored_checkpoint(tmp_path, tiny_overrides):
    result = run_tiny(tmp_path, tiny_overrides, "export=best", "pretrain.epochs=3")
    pre = result.results["pretrain"]
    assert pre["exported_checkpoint"] == "best" and pre["monitor_metric"] == "knn_top1"
    assert pre["best_monitor_knn_top1"] == max(pre["monitor_knn_top1_by_epoch"].values())
    assert "monitor_knn_auc_by_epoch" not in pre  # single-label data: top-1 only
    best = torch.load(result.run_dir / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    exported = safetensors.torch.load_file(result.run_dir / "backbone.safetensors")
    for key, value in exported.items():
        assert torch.equal(value, best["state_dict"]["backbone.model." + key])


@pytest.mark.slow
def test_plain_timm_export_loads_in_timm(tmp_path, tiny_overrides):
    result = run_tiny(tmp_path, tiny_overrides, "backbone.stem=default", "data.image_size=32")
    model = timm.create_model("resnet18", num_classes=0,
                              checkpoint_path=str(result.run_dir / "backbone.safetensors"))
    ours = ssl_pipeline.load_backbone(result.run_dir).eval()
    theirs = model.state_dict()
    assert all(torch.equal(theirs[key], value) for key, value in ours.model.state_dict().items())
    x = torch.rand(2, 3, 32, 32)
    # equal up to float32 rounding: our last stage (1x1 maps at 32 px) runs its convs as
    # matrix products (PointOutputConv2d)
    torch.testing.assert_close(ours(x), model.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_skips_finished_stages(tmp_path, tiny_overrides, capsys):
    first = run_tiny(tmp_path, tiny_overrides)
    before = (first.run_dir / "backbone.safetensors").stat().st_mtime_ns
    again = ssl_pipeline.run(resume=first.run_dir)
    assert (first.run_dir / "backbone.safetensors").stat().st_mtime_ns == before
    assert "already done" in capsys.readouterr().out
    assert again.results["pretrain"] == first.results["pretrain"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.batch_size=1000", "larger than the"),
        ("trainer.precision=16-mixed", "needs a GPU"),
        ("trainer.accelerator=gpu", "no visible GPU"),
        ("trainer.devices=3", "divide evenly"),
    ],
)
def test_bad_settings_fail_before_writing(tmp_path, tiny_overrides, override, message):
    if "gpu" in override.lower() and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SSLPipelineError, match=message):
        run_tiny(tmp_path, tiny_overrides, override)
    if override != "pretrain.batch_size=1000":  # checked before the run directory exists
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_offline_wandb_runs_live_under_their_run_directory(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    overrides = [o for o in tiny_overrides if not o.startswith("tracking")]

    def wandb_ids(run_dir):
        found = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
        stored = set(json.loads((run_dir / "wandb_runs.json").read_text()).values())
        assert found == stored  # one W&B run per stage (and the report), each id stored
        return found

    first = run_tiny(tmp_path, [*overrides, "tracking.wandb.mode=offline"])
    second = ssl_pipeline.run(Path(__file__).parents[1] / "recipes/quickstart.yaml",
                              overrides=[*overrides, "tracking.wandb.mode=offline"],
                              out_dir=tmp_path / "second", quiet=True)
    first_ids, second_ids = wandb_ids(first.run_dir), wandb_ids(second.run_dir)
    stages = yaml.safe_load((first.run_dir / "recipe.yaml").read_text())["stages"]
    assert len(first_ids) == len(stages) + 1  # one per stage, plus the report's
    assert not first_ids & second_ids  # a later run in the same process gets its own W&B runs


@pytest.mark.slow
def test_out_dir_of_an_earlier_run_is_refused_not_mixed(tmp_path, tiny_overrides):
    first = run_tiny(tmp_path, tiny_overrides)
    before = (first.run_dir / "results.json").read_bytes()
    with pytest.raises(SSLPipelineError, match="already holds a run.*--resume"):
        run_tiny(tmp_path, tiny_overrides)
    assert (first.run_dir / "results.json").read_bytes() == before  # nothing lost or mixed


def test_sync_batchnorm_on_several_cpu_processes_fails_before_writing(tmp_path, tiny_overrides):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SSLPipelineError, match="SyncBatchNorm has no CPU kernel"):
        run_tiny(tmp_path, [*tiny_overrides, "trainer.devices=2"], "trainer.sync_batchnorm=true")
    assert not (tmp_path / "run").exists()
