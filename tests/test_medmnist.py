"""MedMNIST: the .npz format exactly as MedMNIST ships it, AUC as its evaluator computes it,
and the transfer recipe end to end with a backbone pretrained by one of our recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from ssl_pipeline.data import build_dataset
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.evals.metrics import auc, probabilities
from ssl_pipeline.recipe import DataConfig

ROOT = Path(__file__).parents[1]


def write_medmnist(folder: Path, subset: str = "pathmnist", size: int = 28, rgb: bool = True,
                   classes: int = 9, counts=(60, 20, 30), seed: int = 0) -> Path:
    """A MedMNIST file: uint8 (N, H, W[, 3]) images whose brightness follows the label,
    integer labels (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        labels = (np.arange(n) % classes).reshape(n, 1).astype(np.uint8)
        shape = (n, size, size, 3) if rgb else (n, size, size)
        base = (labels.reshape((n,) + (1,) * (len(shape) - 1)) * (200 // classes)).astype(np.int64)
        arrays[f"{split}_images"] = np.clip(base + rng.integers(0, 40, shape), 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{subset}.npz" if size == 28 else f"{subset}_{size}.npz")
    np.savez_compressed(path, **arrays)
    return path


def cfg(root: Path, **medmnist) -> DataConfig:
    return DataConfig(name="medmnist", root=str(root), medmnist=medmnist)


def test_an_rgb_subset_loads_with_its_own_splits(tmp_path):
    write_medmnist(tmp_path)
    bundle = build_dataset(cfg(tmp_path, subset="pathmnist"))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (60, 20, 30)
    assert bundle.num_classes == 9 and bundle.channels == 3 and bundle.image_size == 28
    image, label = bundle.test[4]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 4
    assert bundle.train.labels.tolist() == [i % 9 for i in range(60)]
    assert len(bundle.mean) == 3 and all(0 < m < 1 for m in bundle.mean)


def test_a_gray_subset_at_64_px_reads_its_own_file_and_converts_on_request(tmp_path):
    write_medmnist(tmp_path, "pneumoniamnist", size=64, rgb=False, classes=2)
    write_medmnist(tmp_path, "pneumoniamnist", size=28, rgb=False, classes=2, counts=(4, 2, 2))
    bundle = build_dataset(cfg(tmp_path, subset="pneumoniamnist", size=64))
    assert bundle.channels == 1 and bundle.image_size == 64 and len(bundle.train) == 60
    assert bundle.test[0][0].mode == "L"
    rgb = build_dataset(DataConfig(name="medmnist", root=str(tmp_path), channels=3,
                                   medmnist={"subset": "pneumoniamnist", "size": 64}))
    assert rgb.test[0][0].mode == "RGB" and len(rgb.mean) == 3


def test_a_missing_file_says_which_file_goes_where(tmp_path):
    with pytest.raises(SSLPipelineError, match=r"dermamnist_128\.npz.*" + str(tmp_path)):
        build_dataset(cfg(tmp_path, subset="dermamnist", size=128))


@pytest.mark.parametrize("problem, message", [
    ("labels_out_of_range", "classes"),
    ("labels_flat", r"\(N, 1\)"),
    ("float_images", "uint8"),
    ("missing_key", "lacks"),
])
def test_malformed_files_are_clear_errors(tmp_path, problem, message):
    path = write_medmnist(tmp_path, "bloodmnist", classes=8)
    with np.load(path) as data:
        arrays = dict(data)
    if problem == "labels_out_of_range":
        arrays["test_labels"][0] = 8
    if problem == "labels_flat":
        arrays["val_labels"] = arrays["val_labels"].reshape(-1)
    if problem == "float_images":
        arrays["train_images"] = arrays["train_images"].astype(np.float32)
    if problem == "missing_key":
        del arrays["val_images"]
    np.savez(path, **arrays)
    with pytest.raises(SSLPipelineError, match=message):
        build_dataset(cfg(tmp_path, subset="bloodmnist"))


def write_chestmnist(folder: Path, counts=(80, 30, 40), size: int = 28, seed: int = 0) -> Path:
    """ChestMNIST's format: gray uint8 (N, H, W) images, labels (N, 14) of 0/1. Finding j is
    present in about a third of the images and brightens its own patch of the image."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        labels = (rng.random((n, 14)) < 0.33).astype(np.uint8)
        labels[:, 7] = np.arange(n) % 2  # one finding in exactly half: both classes in any split
        images = rng.integers(0, 60, (n, size, size)).astype(np.int64)
        cell = size // 4  # finding j brightens cell j of a 4 x 4 grid
        for j in range(14):
            r, c = divmod(j, 4)
            images[labels[:, j] == 1, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] += 150
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("chestmnist.npz" if size == 28 else f"chestmnist_{size}.npz")
    np.savez_compressed(path, **arrays)
    return path


def test_chestmnist_loads_as_multi_label(tmp_path):
    path = write_chestmnist(tmp_path)
    bundle = build_dataset(cfg(tmp_path, subset="chestmnist"))
    assert bundle.multi_label and bundle.num_classes == 14 and bundle.channels == 1
    assert bundle.class_names[2] == "effusion" or bundle.class_names[2].startswith("class")
    with np.load(path) as data:
        expected = data["test_labels"]
    image, label = bundle.test[3]
    assert image.mode == "L" and label.dtype == np.uint8 and label.tolist() == expected[3].tolist()
    assert np.array_equal(bundle.test.labels, expected)
    with np.load(path) as data:
        arrays = dict(data)
    arrays["val_labels"] = arrays["val_labels"][:, :1]
    np.savez(path, **arrays)
    with pytest.raises(SSLPipelineError, match=r"\(N, 14\)"):
        build_dataset(cfg(tmp_path, subset="chestmnist"))


def test_auc_is_medmnists_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    logits = rng.normal(size=(300, 5)) + np.eye(5)[labels]
    p = probabilities(logits)
    assert np.allclose(p.sum(1), 1)
    ovr = np.mean([roc_auc_score(labels == c, p[:, c]) for c in range(5)])
    assert auc(logits, labels) == pytest.approx(ovr)
    assert auc(logits, labels) == pytest.approx(roc_auc_score(labels, p, multi_class="ovr"))
    binary = rng.integers(0, 2, 100)
    votes = np.abs(rng.normal(size=(100, 2))) + np.eye(2)[binary]  # non-negative: row-normalized
    assert auc(votes, binary) == pytest.approx(roc_auc_score(binary, votes[:, 1] / votes.sum(1)))


@pytest.mark.slow
def test_the_transfer_recipe_evaluates_a_backbone_we_pretrained(tmp_path, tiny_overrides):
    from ssl_pipeline.cli import main

    sets = lambda overrides: [a for o in overrides for a in ("--set", o)]  # noqa: E731
    pretrained = tmp_path / "pretrained"
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--quiet", "--out", str(pretrained),
                 *sets([*tiny_overrides, "stages=[pretrain]"])]) == 0
    write_medmnist(tmp_path / "medmnist", "dermamnist", classes=7, counts=(70, 21, 35))
    out = tmp_path / "transfer"
    overrides = [f"data.root={tmp_path / 'medmnist'}", "data.medmnist.subset=dermamnist",
                 "eval.seeds=1", "eval.linear_probe.epochs=10", "eval.finetune.epochs=1",
                 "eval.finetune.label_fractions=[0.1,1.0]", "eval.few_shot.seeds=2",
                 "eval.few_shot.shots=[1,5]", f"eval.cache_dir={tmp_path / 'cache'}",
                 "tracking.wandb.mode=disabled", "trainer.accelerator=cpu", "trainer.precision=32"]
    assert main(["evaluate", str(ROOT / "recipes" / "transfer_medmnist.yaml"), "--backbone",
                 str(pretrained), "--quiet", "--out", str(out), *sets(overrides)]) == 0
    results = json.loads((out / "results.json").read_text())
    for stage in ("knn", "linear_probe", "finetune", "few_shot"):
        assert stage in results and stage in results["baselines"]["random_init"]
    assert 0 <= results["knn"]["auc"] <= 1 and 0 <= results["linear_probe"]["test_metrics"]["auc"] <= 1
    assert results["knn"]["top1"] > 0.5  # brightness follows the label: easy to separate


@pytest.mark.slow
def test_the_transfer_recipe_on_multi_label_chestmnist(tmp_path, tiny_overrides):
    """A backbone pretrained by the quickstart recipe (gray, 1 channel) evaluated on ChestMNIST
    by every transfer stage: AUC and ACC as MedMNIST defines them for multi-label data, the
    published reference row in the report, and the transfer report."""
    from ssl_pipeline.cli import main

    def sets(overrides):
        return [a for o in overrides for a in ("--set", o)]

    pretrained = tmp_path / "pretrained"
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--quiet", "--out", str(pretrained),
                 # the small stem, as stem auto gives at 16-28 px: the default stride-4 stem
                 # leaves 1x1 maps by the last stages, and the findings' patches blur (the
                 # probe's AUC fell to 0.66)
                 *sets([*tiny_overrides, "stages=[pretrain]", "data.channels=1",
                        "backbone.stem=auto"])]) == 0
    write_chestmnist(tmp_path / "medmnist")
    out = tmp_path / "chest"
    overrides = [f"data.root={tmp_path / 'medmnist'}", "data.medmnist.subset=chestmnist",
                 "eval.seeds=1", "eval.linear_probe.epochs=30", "eval.finetune.epochs=2",
                 "eval.finetune.label_fractions=[0.1,1.0]", "eval.few_shot.seeds=2",
                 "eval.few_shot.shots=[1,5]", "eval.few_shot.vtab_1k=true",
                 f"eval.cache_dir={tmp_path / 'cache'}",
                 "tracking.wandb.mode=disabled", "trainer.accelerator=cpu", "trainer.precision=32"]
    assert main(["evaluate", str(ROOT / "recipes" / "transfer_medmnist.yaml"), "--backbone",
                 str(pretrained), "--quiet", "--out", str(out), *sets(overrides)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["knn"]["multi_label"] and len(results["knn"]["per_label_auc"]) == 14
    assert results["knn"]["auc"] > 0.7  # each finding brightens its own patch
    assert results["linear_probe"]["test_metrics"]["auc"] > 0.7
    assert 0 <= results["finetune"]["auc"] <= 1 and "random" in \
        results["finetune"]["by_fraction"]["0.1"]["subset"]
    assert results["few_shot"]["by_shots"]["5"]["auc"] is not None
    assert results["few_shot"]["vtab_1k"]["val"] == 30  # all of val: fewer than 200
    for stage in ("knn", "linear_probe", "finetune", "few_shot"):
        assert stage in results["baselines"]["random_init"]
    report = (out / "report.md").read_text()
    assert "Published reference" in report and "0.768 / 0.947" in report
    assert "![embedding_map](plots/embedding_map.png)" in report  # a panel per finding
    assert np.load(out / "embedding_map.npz")["labels"].shape[1] == 14
    assert main(["transfer-report", str(out), "--out", str(tmp_path / "transfer")]) == 0
    table = (tmp_path / "transfer" / "transfer.md").read_text()
    assert "| chestmnist (28 px) | backbone |" in table and "0.768 / 0.947" in table


@pytest.mark.slow
def test_pretraining_on_multi_label_data_is_monitored_and_exports_the_best_epoch(tmp_path, tiny_overrides, capsys):
    """ChestMNIST pretraining: the online monitor measures val k-NN AUC (mean over the 14
    labels) every epoch, best.ckpt and `export: best` follow it, and the stage result, the
    progress lines, metrics.jsonl and the report name it as such."""
    from ssl_pipeline.cli import main
    from ssl_pipeline.evals.knn import knn_classify
    from ssl_pipeline.evals.metrics import multi_label_metrics
    from ssl_pipeline.features import extract_features
    from ssl_pipeline.jsonl import read_jsonl

    write_chestmnist(tmp_path / "medmnist")
    out = tmp_path / "run"
    overrides = [*tiny_overrides, "stages=[pretrain]", "data.name=medmnist",
                 f"data.root={tmp_path / 'medmnist'}", "data.medmnist.subset=chestmnist",
                 "data.channels=1", "pretrain.epochs=3", "export=best"]
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out),
                 *[a for o in overrides for a in ("--set", o)]]) == 0
    printed = capsys.readouterr().out
    assert "val k-NN AUC (mean over labels) selects the best checkpoint" in printed
    assert "knn_auc 0." in printed and "knn_top1" not in printed
    pre = json.loads((out / "results.json").read_text())["pretrain"]
    assert pre["monitor_metric"] == "knn_auc" and "monitor_knn_top1_by_epoch" not in pre
    by_epoch = pre["monitor_knn_auc_by_epoch"]
    assert set(by_epoch) == {"1", "2", "3"} and all(0 <= v <= 1 for v in by_epoch.values())
    assert pre["best_monitor_knn_auc"] == pytest.approx(max(by_epoch.values()))
    assert pre["curve"]["knn_auc"] == [pytest.approx(by_epoch[e], abs=1e-5) for e in ("1", "2", "3")]
    assert pre["exported_checkpoint"] == "best" and (out / "checkpoints" / "best.ckpt").is_file()
    assert f"best val k-NN AUC (mean over labels) during pretraining: {pre['best_monitor_knn_auc']:.4f}" in printed
    logged = [row["monitor/knn_auc"] for row in read_jsonl(out / "metrics.jsonl") if "monitor/knn_auc" in row]
    assert logged == [pytest.approx(by_epoch[e], abs=1e-6) for e in ("1", "2", "3")]
    # the exported backbone is the best epoch's: its features give the best value again
    import ssl_pipeline
    from ssl_pipeline.data import TransformedDataset, build_dataset
    from ssl_pipeline.data.transforms import eval_transform
    from ssl_pipeline.recipe import load_recipe

    recipe = load_recipe(out / "recipe.yaml")
    d = yaml.safe_load((out / "recipe.yaml").read_text())["resolved"]["data"]
    bundle = build_dataset(recipe.data)
    transform = eval_transform(d["image_size"], d["mean"], d["std"])
    backbone = ssl_pipeline.load_backbone(out).eval()
    bank, bank_y = extract_features(backbone, torch.utils.data.DataLoader(
        TransformedDataset(bundle.train, transform), batch_size=256), "cpu")
    val, val_y = extract_features(backbone, torch.utils.data.DataLoader(
        TransformedDataset(bundle.val, transform), batch_size=256), "cpu")
    p = recipe.pretrain
    scores = knn_classify(bank, bank_y, val, 14, (p.monitor_k,), p.monitor_temperature)[p.monitor_k]
    again = multi_label_metrics(scores, val_y, kind="probabilities")["auc"]
    assert again == pytest.approx(pre["best_monitor_knn_auc"], abs=1e-4)
    # the report's monitor plot shows the AUC under its own name
    from ssl_pipeline.report import _monitor_figure

    assert (out / "plots" / "monitor.png").is_file()
    figure = _monitor_figure(read_jsonl(out / "metrics.jsonl"), {"pretrain": pre})
    assert figure.axes[0].get_ylabel() == "val k-NN AUC (mean over labels)"


def test_same_sized_datasets_never_share_cached_features_or_baselines(tmp_path):
    """Split hashes hash sample indices only: two MedMNIST subsets with the same split sizes
    have the same ones. The data's own identity keeps their caches apart."""
    import ssl_pipeline
    from ssl_pipeline.backbones import create_backbone, export_backbone

    export_backbone(create_backbone("timm:resnet18", in_chans=3, input_size=28), tmp_path / "bb")
    write_medmnist(tmp_path / "m", "pathmnist", classes=9, counts=(36, 18, 18))
    write_medmnist(tmp_path / "m", "bloodmnist", classes=8, counts=(36, 18, 18), seed=5)
    results = {}
    for subset in ("pathmnist", "bloodmnist", "pathmnist"):
        run = ssl_pipeline.run(
            ROOT / "recipes" / "transfer_medmnist.yaml", out_dir=tmp_path / f"{subset}{len(results)}",
            quiet=True, overrides=[
                "stages=[knn]", f"eval.backbone={tmp_path / 'bb'}", f"data.root={tmp_path / 'm'}",
                f"data.medmnist.subset={subset}", f"eval.cache_dir={tmp_path / 'cache'}",
                "eval.baselines=[random_init]", "tracking.wandb.mode=disabled",
                "trainer.accelerator=cpu", "trainer.precision=32"])
        results[len(results)] = run.results
    path, blood, again = results.values()
    assert blood["knn"]["confusion_matrix"] != path["knn"]["confusion_matrix"]
    assert len(blood["knn"]["per_class_accuracy"]) == 8 and len(path["knn"]["per_class_accuracy"]) == 9
    assert "reused" not in blood["baselines"]["random_init"]["knn"]
    assert again["baselines"]["random_init"]["knn"]["reused"]  # the same data again: reused
    # k-NN reads train and test: 2 subsets x 2 subjects x 2 splits, none shared
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2 * 2 * 2
