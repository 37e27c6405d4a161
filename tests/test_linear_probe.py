"""The linear probe on synthetic cached features: it learns, it selects on validation only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.evals.linear_probe import linear_probe

FAST = {"epochs": 15, "batch_size": 64}
SMALL_GRID = {"lr": (1e-2, 1e-1), "weight_decay": (0.0, 0.1)}


def splits(spread, num_classes=4, dim=16, sizes=(240, 120, 120), seed=0):
    """(x, y) for train, val and test around shared class centers."""
    rng = np.random.default_rng(seed)
    centers = 3 * rng.normal(size=(num_classes, dim))
    out = []
    for size in sizes:
        y = rng.integers(0, num_classes, size)
        out += [(centers[y] + spread * rng.normal(size=(size, dim))).astype(np.float32), y]
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Steps here are tiny: on 2 shared cores a second thread only adds waiting (~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_separable_data_is_learned():
    data = splits(spread=0.5)
    result = linear_probe(*data, 4, grid=SMALL_GRID, seeds=2, **FAST)
    assert result["top1"] == 1.0 and result["val_top1"] == 1.0
    assert result["test_metrics"]["top1"] == result["by_seed"][0]["top1"]
    assert result["test_metrics"]["confusion_matrix"] == np.diag(np.bincount(data[5])).tolist()
    assert json.loads(json.dumps(result)) == result


def test_choice_depends_on_validation_only():
    train_x, train_y, val_x, val_y, test_x, test_y = splits(spread=3.0)
    result = linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, 4, grid=SMALL_GRID, **FAST)
    scrambled = np.random.default_rng(1).permutation(test_y)
    other = linear_probe(train_x, train_y, val_x, val_y, test_x, scrambled, 4, grid=SMALL_GRID, **FAST)
    for key in ("chosen", "val_top1", "grid"):
        assert other[key] == result[key]
    assert other["top1"] != result["top1"]  # the test labels do count, but only on test
    val_top1 = [entry["val_top1"] for entry in result["grid"]]
    assert len(set(val_top1)) > 1  # the choice is not a tie
    best = result["grid"][int(np.argmax(val_top1))]
    assert result["chosen"] == {"lr": best["lr"], "weight_decay": best["weight_decay"]}


def test_seeds_give_mean_and_std_and_the_same_seed_the_same_result():
    data = splits(spread=3.0)
    result = linear_probe(*data, 4, grid=SMALL_GRID, seeds=3, **FAST)
    assert [run["seed"] for run in result["by_seed"]] == [0, 1, 2] and result["seeds"] == 3
    top1 = [run["top1"] for run in result["by_seed"]]
    assert result["top1"] == pytest.approx(np.mean(top1))
    assert result["top1_std"] == pytest.approx(np.std(top1, ddof=1)) and result["top1_std"] >= 0
    assert linear_probe(*data, 4, grid=SMALL_GRID, seeds=3, **FAST) == result


def test_feature_scale_does_not_matter():
    data = splits(spread=3.0)
    scaled = [part * 1000 if i % 2 == 0 else part for i, part in enumerate(data)]  # features only
    result = linear_probe(*data, 4, grid=SMALL_GRID, seeds=1, **FAST)
    assert linear_probe(*scaled, 4, grid=SMALL_GRID, seeds=1, **FAST)["chosen"] == result["chosen"]


@pytest.mark.parametrize("bad", ["val_dim", "test_labels", "seeds", "label_range", "grid_key"])
def test_mismatched_inputs_are_a_user_error(bad):
    train_x, train_y, val_x, val_y, test_x, test_y = splits(spread=1.0)
    kwargs = {"seeds": 0 if bad == "seeds" else 1}
    if bad == "val_dim":
        val_x = val_x[:, :8]
    if bad == "test_labels":
        test_y = test_y[:-1]
    if bad == "label_range":
        train_y = train_y + 1  # 1..4 with num_classes=4
    if bad == "grid_key":
        kwargs["grid"] = {"lr": (0.1,), "wd": (0.0,)}
    with pytest.raises(SSLPipelineError):
        linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, 4, **kwargs)


def test_a_feature_constant_on_train_is_ignored_not_amplified():
    train_x, train_y, val_x, val_y, test_x, test_y = splits(spread=3.0)
    dead = [np.zeros((len(train_x), 1), np.float32)] + [np.full((len(x), 1), 50.0, np.float32)
                                                         for x in (val_x, test_x)]
    with_dead = [np.hstack([x, d]) for x, d in zip((train_x, val_x, test_x), dead)]
    args = dict(grid=SMALL_GRID, seeds=1, **FAST)
    plain = linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, 4, **args)
    other = linear_probe(with_dead[0], train_y, with_dead[1], val_y, with_dead[2], test_y, 4, **args)
    assert other["top1"] == plain["top1"] and other["chosen"] == plain["chosen"]


def test_features_stay_on_the_gpu_only_when_they_fit_in_half_its_free_memory(monkeypatch):
    """ImageNet's train features (1.28M x 2048 floats, 10.5 GB) stay in host memory on a 16 GB
    GPU, each batch copied over; small ones move to the GPU once. No GPU is touched here."""
    from ssl_pipeline.evals import linear_probe as probe

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 * 2**30, 24 * 2**30))
    assert probe.feature_device(gpu, 1_281_167 * 2048 * 4) == torch.device("cpu")
    assert probe.feature_device(gpu, 60_000 * 512 * 4) == gpu
    assert probe.feature_device(torch.device("cpu"), 10**12) == torch.device("cpu")


def test_scores_in_chunks_equal_one_product_and_training_on_a_named_device_equals_the_default():
    from ssl_pipeline.evals.linear_probe import fit_linear, scores

    x, y = splits(1.0)[:2]
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    heads = fit_linear(x, y, 4, [(1e-2, 0.0)], seed=0, epochs=2, batch_size=64)
    named = fit_linear(x, y, 4, [(1e-2, 0.0)], seed=0, epochs=2, batch_size=64, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(heads[0], named[0], strict=True))
    assert np.allclose(scores(heads[0], x, chunk=7), scores(heads[0], x), atol=1e-6)
