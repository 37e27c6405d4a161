"""eval.feature_precision: bf16 features are close to float32 ones and cached apart from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_pipeline.backbones import create_backbone
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.features import cache_key, extract_features
from ssl_pipeline.recipe import apply_overrides, recipe_from_dict


@pytest.fixture(scope="module")
def backbone_and_loader():
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", in_chans=1, input_size=28, mean=(0.5,), std=(0.25,))
    images = torch.rand(40, 1, 28, 28)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.arange(40) % 4), batch_size=16)
    return backbone, loader


def test_bf16_features_are_float32_within_bf16_rounding(backbone_and_loader):
    backbone, loader = backbone_and_loader
    fp32, labels = extract_features(backbone, loader)
    bf16, labels_bf16 = extract_features(backbone, loader, precision="bf16")
    assert fp32.dtype == bf16.dtype == np.float32 and fp32.shape == bf16.shape
    np.testing.assert_array_equal(labels, labels_bf16)
    assert not np.array_equal(fp32, bf16)  # autocast took effect
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99
    with torch.no_grad():  # float32 is the plain eval loop's result, as before the option
        backbone.eval()
        plain = torch.cat([backbone(x) for x, _ in loader]).numpy()
    np.testing.assert_array_equal(fp32, plain)


def test_bf16_features_have_their_own_cache_entries():
    fp32 = cache_key("weights", "transform", "split")
    assert cache_key("weights", "transform", "split", "fp32") == fp32  # old entries still found
    assert cache_key("weights", "transform", "split", "bf16") != fp32


def test_the_recipe_accepts_only_known_precisions():
    recipe = recipe_from_dict(apply_overrides({"name": "x"}, ["eval.feature_precision=bf16"]))
    assert recipe.eval.feature_precision == "bf16"
    assert recipe_from_dict({"name": "x"}).eval.feature_precision == "fp32"
    with pytest.raises(SSLPipelineError, match="feature_precision"):
        recipe_from_dict(apply_overrides({"name": "x"}, ["eval.feature_precision=fp16"]))


def test_the_option_reaches_every_evaluated_subject(tiny_overrides, tmp_path, monkeypatch):
    """A run with eval.feature_precision=bf16 extracts the backbone's and the baselines'
    features in bf16 (the monitor during pretraining keeps float32)."""
    from pathlib import Path

    import ssl_pipeline
    from ssl_pipeline import features as features_module

    seen = []
    real = features_module.extract_features

    def spy(backbone, loader, device="cpu", progress=None, precision="fp32"):
        seen.append(precision)
        return real(backbone, loader, device, progress, precision)

    monkeypatch.setattr(features_module, "extract_features", spy)
    quickstart = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    ssl_pipeline.run(quickstart, out_dir=tmp_path / "run", quiet=True, overrides=[
        *tiny_overrides, "stages=[pretrain, knn]", "eval.feature_precision=bf16",
        f"eval.cache_dir={tmp_path / 'cache'}", "eval.knn.settings=[[5, 0.07]]"])
    # 3 subjects (backbone, random init, raw pixels) x 3 splits (train, val, test), all in bf16,
    # after the monitor's float32 ones during pretraining (seen here only when the monitor's
    # module is first imported after the spy is in place)
    first_bf16 = seen.index("bf16")
    assert set(seen[:first_bf16]) <= {"fp32"} and seen[first_bf16:] == ["bf16"] * 9, seen
