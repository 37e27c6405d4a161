"""The imagenet dataset on miniature ILSVRC-2012 folders in every val layout, ImageNet-100,
and the ImageNet recipes: published settings, and an end-to-end smoke run of each."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mini_imagenet import NAMES, WNIDS, make_mini_imagenet

from ssl_pipeline.data import build_dataset
from ssl_pipeline.data.imagenet import IMAGENET100
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.recipe import DataConfig, load_recipe

ROOT = Path(__file__).parents[1]
RECIPES = sorted(ROOT.glob("recipes/imagenet*.yaml"))


def imagenet_cfg(root: Path, **overrides) -> DataConfig:
    return DataConfig(name="imagenet", root=str(root), val_fraction=0.25, **overrides)


def labels_of(bundle) -> dict[str, int]:
    """`{file name: label}` of the test split (ImageNet's val set)."""
    test = bundle.test
    return {test.source.paths[i].name: int(test.source.labels[i]) for i in test.indices}


@pytest.mark.parametrize("layout", ["folders", "devkit", "devkit_tar", "kaggle"])
def test_every_val_layout_gives_the_same_labels(tmp_path, layout):
    data_root = make_mini_imagenet(tmp_path / layout, layout)
    reference_root = make_mini_imagenet(tmp_path / "reference", "folders")
    bundle = build_dataset(imagenet_cfg(data_root))
    reference = build_dataset(imagenet_cfg(reference_root))
    assert labels_of(bundle) == labels_of(reference)
    assert len(bundle.test) == 16 and bundle.num_classes == 4
    assert (len(bundle.train), len(bundle.val)) == (36, 12)  # val carved from train, stratified
    assert np.bincount(bundle.val.labels).tolist() == [3, 3, 3, 3]
    # labels follow the sorted wnids, whatever the devkit's ILSVRC2012_IDs are
    by_label = {int(bundle.test.source.labels[i]): bundle.test.source.paths[i]
                for i in bundle.test.indices}
    image, _ = bundle.test[0]
    assert image.mode == "RGB" and bundle.image_size == 224
    assert bundle.mean == (0.485, 0.456, 0.406)
    assert bundle.class_names[0] == f"{WNIDS[0]} tench"  # meta.bin, meta.mat or Kaggle's mapping
    assert set(by_label) == {0, 1, 2, 3}


def test_flat_val_images_are_labelled_by_their_ground_truth(tmp_path):
    data_root = make_mini_imagenet(tmp_path, "devkit")
    bundle = build_dataset(imagenet_cfg(data_root))
    truth = (tmp_path / "ILSVRC2012_devkit_t12" / "data" /
             "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    ids = {len(WNIDS) - i: i for i in range(len(WNIDS))}  # the fixture's ID -> sorted position
    labels = labels_of(bundle)
    for n, ilsvrc_id in enumerate(truth, start=1):
        assert labels[f"ILSVRC2012_val_{n:08d}.JPEG"] == ids[int(ilsvrc_id)]
    assert bundle.class_names == [f"{w} {NAMES[w].split(',')[0]}" for w in WNIDS]


def test_a_flat_val_without_ground_truth_says_what_to_put_where(tmp_path):
    data_root = make_mini_imagenet(tmp_path, "devkit")
    (tmp_path / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt").unlink()
    with pytest.raises(SSLPipelineError, match="ILSVRC2012_devkit_t12.tar.gz.*LOC_val_solution.csv"):
        build_dataset(imagenet_cfg(data_root))


def test_val_labels_can_be_named(tmp_path):
    data_root = make_mini_imagenet(tmp_path / "a", "kaggle")
    moved = tmp_path / "labels.csv"
    (tmp_path / "a" / "LOC_val_solution.csv").rename(moved)
    with pytest.raises(SSLPipelineError, match="flat"):
        build_dataset(imagenet_cfg(data_root))
    bundle = build_dataset(imagenet_cfg(data_root, imagenet={"val_labels": str(moved)}))
    assert len(bundle.test) == 16


def test_a_class_list_keeps_only_its_classes_in_every_split(tmp_path):
    data_root = make_mini_imagenet(tmp_path, "devkit")
    listed = tmp_path / "three.txt"
    listed.write_text("# three of four\n" + "\n".join(WNIDS[1:]) + "\n")
    bundle = build_dataset(imagenet_cfg(data_root, imagenet={"class_list": str(listed)}))
    assert bundle.num_classes == 3 and [c.split()[0] for c in bundle.class_names] == WNIDS[1:]
    assert (len(bundle.train) + len(bundle.val), len(bundle.test)) == (36, 12)
    assert all(WNIDS[0] not in str(bundle.train.source.paths[i]) for i in bundle.train.indices)


def test_imagenet100_is_cmcs_hundred_classes(tmp_path):
    assert len(IMAGENET100) == len(set(IMAGENET100)) == 100
    assert IMAGENET100[:3] == ["n02869837", "n01749939", "n02488291"]
    data_root = make_mini_imagenet(tmp_path, "folders")  # none of ImageNet-100's classes
    with pytest.raises(SSLPipelineError, match="100 class"):
        build_dataset(imagenet_cfg(data_root, imagenet={"class_list": "imagenet100"}))
    mini100 = make_mini_imagenet(tmp_path / "in100", "folders", train_per_class=4,
                                 val_per_class=1, wnids=sorted(IMAGENET100)[:2] + WNIDS[:1])
    # the three classes exist, but ImageNet-100 needs all of its 100
    with pytest.raises(SSLPipelineError, match="98 class"):
        build_dataset(imagenet_cfg(mini100, imagenet={"class_list": "imagenet100"}))


def test_a_label_subset_can_come_from_an_image_list(tmp_path):
    from ssl_pipeline.evals.subsets import listed_subset

    bundle = build_dataset(imagenet_cfg(make_mini_imagenet(tmp_path, "folders")))
    train_names = [bundle.train.source.paths[i].name for i in bundle.train.indices]
    val_name = bundle.val.source.paths[bundle.val.indices[0]].name
    listing = tmp_path / "1percent.txt"
    listing.write_text(f"{train_names[5]}\n{WNIDS[0]}/{train_names[0]}\n{val_name}\n\n")
    positions, note = listed_subset(bundle.train, str(listing))
    assert positions.tolist() == [0, 5] and "2 of 3 images" in note and "validation" in note
    listing.write_text("n09999999_1.JPEG\n")
    with pytest.raises(SSLPipelineError, match="none of the 1 images"):
        listed_subset(bundle.train, str(listing))


@pytest.mark.parametrize("problem", ["no_root", "no_val", "one_class", "mixed_val", "bad_list"])
def test_unusable_imagenet_folders_are_clear_errors(tmp_path, problem):
    data_root = make_mini_imagenet(tmp_path, "folders")
    overrides = {}
    if problem == "no_root":
        data_root = tmp_path / "nowhere"
    if problem == "no_val":
        for path in sorted((data_root / "val").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (data_root / "val").rmdir()
    if problem == "one_class":
        for wnid in WNIDS[1:]:
            for path in (data_root / "train" / wnid).iterdir():
                path.unlink()
    if problem == "mixed_val":
        next((data_root / "val" / WNIDS[0]).iterdir()).rename(data_root / "val" / "stray.JPEG")
    if problem == "bad_list":
        (tmp_path / "list.txt").write_text("tench\n")
        overrides = {"imagenet": {"class_list": str(tmp_path / "list.txt")}}
    with pytest.raises(SSLPipelineError):
        build_dataset(imagenet_cfg(data_root, **overrides))


# ---------------------------------------------------------------- the recipes


def test_the_recipes_carry_the_published_settings():
    simclr = load_recipe(ROOT / "recipes" / "imagenet_simclr_resnet50.yaml")
    p = simclr.pretrain
    assert (p.optimizer, p.epochs, p.batch_size, p.weight_decay, p.warmup_epochs) == \
        ("lars", 100, 4096, 1e-6, 10)
    assert (p.lr, p.lr_scaling, p.lr_reference_batch) == (0.075, "sqrt", 1)  # 0.075 x sqrt(4096) = 4.8
    assert simclr.method.simclr.temperature == 0.1 and simclr.backbone.name == "timm:resnet50"

    simsiam = load_recipe(ROOT / "recipes" / "imagenet_simsiam_resnet50.yaml")
    p = simsiam.pretrain
    assert (p.optimizer, p.epochs, p.batch_size, p.lr, p.lr_reference_batch, p.weight_decay) == \
        ("sgd", 100, 512, 0.05, 256, 1e-4)
    assert simsiam.method.simsiam.fixed_predictor_lr and simsiam.method.simsiam.projection_dim == 2048
    assert simsiam.trainer.sync_batchnorm

    supervised = load_recipe(ROOT / "recipes" / "imagenet_supervised_resnet50.yaml")
    assert supervised.method.name == "supervised" and supervised.pretrain.epochs == 90
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.data.name == "imagenet" and recipe.trainer.devices > 1
        header = "".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        assert re.search(r"\[(google-research/simclr|facebookresearch/simsiam)", header)  # sources
    for path in RECIPES:  # fine-tuning validates 10 epochs a run (a pass costs 1/3-2/3 of a 1% epoch)
        assert load_recipe(path).eval.finetune.validations == 10
    for path in ROOT.glob("recipes/imagenet_*.yaml"):  # the papers' probe, beside ours
        assert {"linear_probe", "linear_probe_classic"} <= set(load_recipe(path).stages)
    for path in ROOT.glob("recipes/imagenet100_*.yaml"):
        assert load_recipe(path).data.imagenet.class_list == "imagenet100"


def smoke_overrides(data_root: Path, tmp_path: Path) -> list[str]:
    """The recipe as written, shrunk to seconds: small images, a few steps, one device. The
    backbone keeps the stem it has at the recipe's 224 px (stem `auto` would switch a ResNet-50
    to the small stride-1 stem at 32 px: 16x the convolutions' work)."""
    return [f"data.root={data_root}", "data.image_size=32", "data.num_workers=0",
            "backbone.stem=default",
            "pretrain.epochs=1", "pretrain.max_steps=3", "pretrain.batch_size=8",
            "pretrain.monitor_every_n_epochs=1", "pretrain.checkpoint_every_n_steps=2",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32",
            "trainer.sync_batchnorm=false", "eval.seeds=1", "eval.batch_size=32",
            "eval.linear_probe.epochs=3", "eval.finetune.epochs=1", "eval.finetune.batch_size=8",
            "eval.linear_probe_classic.epochs=1", "eval.linear_probe_classic.batch_size=16",
            f"eval.cache_dir={tmp_path / 'cache'}", "tracking.wandb.mode=disabled"]


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_each_imagenet_recipe_runs_end_to_end_on_a_miniature_ilsvrc_folder(tmp_path, path):
    from ssl_pipeline.cli import main

    hundred = path.name.startswith("imagenet100")
    layout = "devkit_tar" if RECIPES.index(path) % 2 else "folders"  # both val layouts
    wnids = sorted(IMAGENET100) if hundred else WNIDS
    data_root = make_mini_imagenet(tmp_path / "ilsvrc", layout, wnids=wnids,
                                   train_per_class=3 if hundred else 12,
                                   val_per_class=1 if hundred else 4)
    out = tmp_path / "run"
    overrides = smoke_overrides(data_root, tmp_path)
    # the recipes hold out 1-2% of ImageNet's train set; of a miniature one, a class-balanced share
    overrides.append(f"data.val_fraction={0.34 if hundred else 0.25}")
    listed = "simclr_resnet50" in path.name  # SimCLR's 1% list, as users supply it
    if listed:
        (tmp_path / "1percent.txt").write_text("".join(f"{w}_0.JPEG\n{w}_1.JPEG\n" for w in WNIDS))
        overrides.append(f"eval.finetune.subset_files={{0.01: {tmp_path / '1percent.txt'}}}")
    status = main(["run", str(path), "--quiet", "--out", str(out),
                   *[a for o in overrides for a in ("--set", o)]])
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    classes = 100 if hundred else 4
    for metrics in (results["knn"], results["linear_probe"]["test_metrics"]):
        assert 0 <= metrics["top1"] <= 1 and len(metrics["per_class_accuracy"]) == classes
    by_fraction = results["finetune"]["by_fraction"]
    assert set(by_fraction) == {"0.01", "0.1"} and by_fraction["0.1"]["subset"] == "class-balanced, seeded"
    if listed:
        assert by_fraction["0.01"]["subset"].startswith("listed in 1percent.txt")
        assert 1 <= by_fraction["0.01"]["train_samples"] <= 8
        assert "1% labels (listed in 1percent.txt" in (out / "report.md").read_text()
    if "linear_probe_classic" in load_recipe(path).stages:  # the ResNet-50 recipes
        assert 0 <= results["linear_probe_classic"]["top1"] <= 1
    assert "random_init" in results["baselines"]
    data = yaml.safe_load((out / "recipe.yaml").read_text())["resolved"]["data"]
    assert data["name"] == "imagenet" and data["num_classes"] == classes
    assert data["sizes"]["test"] == (100 if hundred else 16)  # ImageNet's val set is the test split
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3

    # the estimate projects the fine-tuning runs the pipeline did: both backbones' fractions x seeds
    from ssl_pipeline.estimate import estimate

    projected = estimate(str(path), overrides, steps=2, warmup=1, quiet=True)["evaluation"]
    done = [results["finetune"], results["baselines"]["random_init"]["finetune"]]
    assert projected["finetune"]["runs"] == sum(len(f["by_seed"]) for r in done
                                                for f in r["by_fraction"].values())
    assert projected["projected_seconds"] > 0
