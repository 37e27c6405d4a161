"""Pretraining methods: each lowers its loss on a fixed batch; optimizer and schedule rules."""

import pytest
import torch
from lightly.loss import NTXentLoss

from ssl_pipeline.methods import OptimSettings, methods
from ssl_pipeline.methods.base import build_optimizer, effective_lr
from ssl_pipeline.methods.settings import settings_model
from ssl_pipeline.registry import Registry
from ssl_pipeline.errors import SSLPipelineError


class TinyBackbone(torch.nn.Module):
    """A small conv net honouring the backbone contract (features (B, D), feature_dim)."""

    feature_dim = 32

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )

    def forward(self, x):
        return self.net(x)


def fixed_batch(method_name: str):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 12, 12, generator=g)
    y = torch.arange(16) % 4
    if methods.get(method_name).obj.needs_labels:
        return x, y
    noise = 0.1 * torch.randn(16, 3, 12, 12, generator=g)
    return [x, (x + noise).clamp(0, 1)], y


@pytest.mark.parametrize("name", methods.names())
def test_each_method_lowers_its_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    cls = methods.get(name).obj
    method = cls(TinyBackbone(), OptimSettings(), num_classes=4)
    batch = fixed_batch(name)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss, extras = method.training_loss(batch)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses


def test_simclr_loss_is_lightlys_ntxent():
    method = methods.get("simclr").obj(TinyBackbone(), OptimSettings(), temperature=0.3)
    (x0, x1), _ = fixed_batch("simclr")
    z0, z1 = method(torch.cat([x0, x1])).chunk(2)
    assert torch.allclose(method.criterion(z0, z1), NTXentLoss(temperature=0.3)(z0, z1))
    assert method.criterion.gather_distributed  # negatives from every process under DDP


def test_simsiam_logs_collapse_metric_and_keeps_predictor_lr_fixed():
    method = methods.get("simsiam").obj(TinyBackbone(), OptimSettings(), projection_dim=64,
                                        prediction_hidden_dim=16)
    _, extras = method.training_loss(fixed_batch("simsiam"))
    assert 0 < extras["collapse_std"] <= 1
    groups = method.param_groups()
    predictor = {id(p) for p in method.prediction_head.parameters()}
    fixed = [p for g in groups if g.get("fixed_lr") for p in g["params"]]
    assert {id(p) for p in fixed} == predictor


def test_supervised_needs_labels():
    with pytest.raises(SSLPipelineError, match="labeled"):
        methods.get("supervised").obj(TinyBackbone(), OptimSettings(), num_classes=None)


def test_no_weight_decay_on_norms_and_biases():
    method = methods.get("supervised").obj(TinyBackbone(), OptimSettings(), num_classes=4)
    groups = {g["name"]: g for g in method.param_groups()}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    for name, p in method.named_parameters():
        is_norm_or_bias = name.endswith("bias") or ".1." in name  # net.1 is the BatchNorm
        assert (id(p) in no_decay) == is_norm_or_bias, name


@pytest.mark.parametrize("optimizer", ["sgd", "lars", "adamw"])
def test_optimizers(optimizer):
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = build_optimizer([{"params": params}], OptimSettings(optimizer=optimizer, lr=0.5))
    assert opt.param_groups[0]["lr"] == 0.5


def test_lr_scaling_rules():
    assert effective_lr(0.05, 512, 256, "linear") == pytest.approx(0.1)  # SimSiam
    assert effective_lr(0.075, 4096, 1, "sqrt") == pytest.approx(4.8)  # SimCLR with LARS
    assert effective_lr(0.3, 4096, 256, "none") == 0.3


def test_settings_model_mirrors_constructor_defaults():
    settings = settings_model(methods.get("simclr").obj)()
    assert settings.temperature == 0.5 and settings.output_dim == 128
    with pytest.raises(Exception):
        settings_model(methods.get("simclr").obj)(temprature=0.1)


def test_registry_is_generic():
    registry: Registry = Registry("thing")
    registry.register("a", "first")(1)
    with pytest.raises(ValueError):
        registry.register("a", "again")(2)
    assert "a" in registry and registry.names() == ["a"]


@pytest.mark.parametrize("name", methods.names())
def test_uint8_batches_become_the_views_the_loss_takes(name):
    from ssl_pipeline.data.device_views import DeviceViews
    from ssl_pipeline.data.transforms import fit_views

    cls = methods.get(name).obj
    method = cls(TinyBackbone(), OptimSettings(), num_classes=4)
    float_batch = fixed_batch(name)
    assert method.on_after_batch_transfer(float_batch, 0) is float_batch  # no device views
    method.device_views = DeviceViews(fit_views(12, 3, {}), 12, (0.5,) * 3, (0.25,) * 3,
                                      cls.num_views)
    assert method.on_after_batch_transfer(float_batch, 0) is float_batch  # already views
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    x, y = method.on_after_batch_transfer([images, torch.arange(16) % 4], 0)
    views = x if cls.num_views > 1 else [x]
    assert isinstance(x, list) == (cls.num_views > 1) and len(views) == cls.num_views
    assert all(v.shape == (16, 3, 12, 12) and v.dtype == torch.float32 for v in views)
    loss, _ = method.training_loss((x, y))
    assert torch.isfinite(loss)
