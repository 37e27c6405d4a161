"""Backbone contract: build, (B, feature_dim) out, export/load bit-identical, loading policy."""

from __future__ import annotations

import copy
import json
import os
import shlex
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from ssl_pipeline.backbones import (
    INPUT_CONV_RULES,
    PointOutputConv2d,
    backbones,
    create_backbone,
    export_backbone,
    load_backbone,
    point_output_convs,
    replace_input_conv,
)
from ssl_pipeline.errors import SSLPipelineError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # models this small at 32-64 px gain nothing from intra-op threads, and on a busy 2-core
    # machine two spinning threads per process made this file three times slower
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# The architectures of the ImageNet literature, each at the smallest input it runs on.
LITERATURE = [
    pytest.param("torchvision:alexnet", 64, {}, id="alexnet"),  # < 63 px shrinks to 0 px
    pytest.param("torchvision:vgg11", 32, {}, id="vgg11"),
    pytest.param("torchvision:googlenet", 32, {}, id="googlenet"),
    pytest.param("timm:resnet18", 32, {}, id="resnet18"),
    pytest.param("torchvision:resnet50", 32, {}, id="resnet50"),
    pytest.param("timm:densenet121", 32, {}, id="densenet121"),
    pytest.param("timm:mobilenetv3_small_100", 32, {}, id="mobilenetv3"),
    pytest.param("timm:efficientnet_b0", 32, {}, id="efficientnet_b0"),
    pytest.param("timm:seresnet50", 32, {}, id="seresnet50"),
    pytest.param("timm:vit_small_patch16_224", 32, {"img_size": 32}, id="vit_s16"),
    pytest.param("timm:deit_small_patch16_224", 32, {"img_size": 32}, id="deit_s"),
    pytest.param("timm:botnet26t_256", 32, {"img_size": 32}, id="botnet26"),
]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name,size,model_kwargs", LITERATURE)
def test_contract_and_bit_identical_round_trip(name, size, model_kwargs, tmp_path):
    backbone = create_backbone(name, input_size=size, **model_kwargs)
    assert backbone.training  # measuring feature_dim must not leave it in eval mode
    x = torch.randn(2, 3, size, size)
    assert backbone(x).shape == (2, backbone.feature_dim)

    export_backbone(backbone, tmp_path)
    loaded = load_backbone(tmp_path)

    assert not loaded.training
    assert (loaded.name, loaded.stem, loaded.feature_dim) == (
        backbone.name,
        backbone.stem,
        backbone.feature_dim,
    )
    assert loaded.preprocessing == backbone.preprocessing
    assert_same_state(backbone.model, loaded.model)
    backbone.eval()
    with torch.no_grad():
        assert torch.equal(backbone(x), loaded(x))


@pytest.mark.parametrize(
    "name", ["timm:resnet18", "torchvision:resnet18", "timm:resnet10t"]  # resnet10t: deep stem
)
def test_small_stem_for_28px_gray_images(name):
    backbone = create_backbone(name, in_chans=1, input_size=28)
    conv1 = backbone.model.conv1
    assert backbone.stem == "small" and backbone.input_conv_rule == "small_stem"
    assert isinstance(conv1, nn.Conv2d)
    assert (conv1.in_channels, conv1.kernel_size, conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(backbone.model.maxpool, nn.Identity)
    assert backbone(torch.randn(2, 1, 28, 28)).shape == (2, backbone.feature_dim)


def test_small_stem_keeps_the_last_feature_map_large():
    x = torch.randn(1, 1, 28, 28)
    small = create_backbone("timm:resnet18", in_chans=1, stem="small").model.eval()
    default = create_backbone("timm:resnet18", in_chans=1, stem="default").model.eval()
    # 28 px: the small stem ends at 4x4 (28, 14, 7, 4); the ImageNet stem at 1x1
    assert small.forward_features(x).shape[-1] == 4
    assert default.forward_features(x).shape[-1] == 1


@pytest.mark.parametrize("size,expected", [(32, "small"), (64, "small"), (65, "default"),
                                           (224, "default"), (None, "default")])  # fmt: skip
def test_auto_stem_picks_small_up_to_64px(size, expected):
    assert create_backbone("timm:resnet18", input_size=size).stem == expected


@pytest.mark.parametrize("name", ["timm:vit_small_patch16_224", "torchvision:shufflenet_v2_x0_5"])
def test_small_stem_refused_outside_the_resnet_family(name):
    with pytest.raises(SSLPipelineError, match="ResNet-family"):
        create_backbone(name, stem="small")


@pytest.mark.parametrize("in_chans", [1, 13])
@pytest.mark.parametrize(
    "name", ["timm:resnet18", "torchvision:resnet18", "torchvision:mobilenet_v3_small"]
)
def test_any_number_of_input_channels(name, in_chans):
    backbone = create_backbone(name, in_chans=in_chans, input_size=32, stem="default")
    first_conv = next(m for m in backbone.model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_chans
    assert backbone.input_conv_rule == "random_init"
    p = backbone.preprocessing
    assert len(p.mean) == len(p.std) == in_chans == p.in_chans
    assert backbone(torch.randn(2, in_chans, 32, 32)).shape == (2, backbone.feature_dim)


def test_normalization_broadcast_from_rgb_defaults():
    gray = create_backbone("timm:resnet18", in_chans=1).preprocessing
    bands = create_backbone("timm:resnet18", in_chans=13).preprocessing
    rgb = timm.create_model("resnet18").pretrained_cfg["mean"]
    assert gray.mean == pytest.approx((sum(rgb) / 3,))
    assert bands.mean == tuple(rgb[i % 3] for i in range(13))
    with pytest.raises(SSLPipelineError, match="in_chans=13"):
        create_backbone("timm:resnet18", in_chans=13, mean=(0.5, 0.5, 0.5))


def test_pretrained_rgb_filters_adapted_by_timm_rule():
    model = torchvision.models.resnet18()
    rgb = torch.linspace(-1, 1, 64 * 3 * 7 * 7).reshape(64, 3, 7, 7)  # stands in for pretrained
    with torch.no_grad():
        model.conv1.weight.copy_(rgb)

    gray = copy.deepcopy(model)
    assert replace_input_conv(gray, 1, adapt_weights=True) == "adapt_input_conv"
    torch.testing.assert_close(gray.conv1.weight, rgb.sum(dim=1, keepdim=True))

    bands = copy.deepcopy(model)
    replace_input_conv(bands, 13, adapt_weights=True)
    assert bands.conv1.weight.shape == (64, 13, 7, 7)
    for c in range(13):  # R, G, B, R, ... each scaled by 3/13
        torch.testing.assert_close(bands.conv1.weight[:, c], rgb[:, c % 3] * 3 / 13)

    fresh = copy.deepcopy(model)
    assert replace_input_conv(fresh, 13, adapt_weights=False) == "random_init"
    assert not torch.equal(fresh.conv1.weight[:, :3], bands.conv1.weight[:, :3])
    assert set(INPUT_CONV_RULES) >= {"none", "adapt_input_conv", "random_init", "small_stem"}


def assert_same_outputs(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    """A plain timm/torchvision model and our backbone with the same weights compute the same
    function: equal up to float32 rounding, as our convs with a 1x1 output (the last stage of
    a ResNet on 32 px images) run as a matrix product (PointOutputConv2d)."""
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_timm_loads_our_export_with_checkpoint_path(tmp_path):
    backbone = create_backbone("timm:resnet18", input_size=32, stem="default").eval()
    path = export_backbone(backbone, tmp_path)
    model = timm.create_model("resnet18", num_classes=0, checkpoint_path=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_outputs(model(x), backbone(x))
        assert torch.equal(load_backbone(path)(x), backbone(x))  # the file path works too


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18"])
def test_a_small_stem_export_loads_into_a_plain_model_with_the_readmes_two_lines(name, tmp_path):
    backbone = create_backbone(name, input_size=32).eval()
    assert backbone.stem == "small"
    path = export_backbone(backbone, tmp_path)
    assert json.loads((tmp_path / "backbone.json").read_text())["stem"] == "small"
    if name.startswith("timm:"):
        model = timm.create_model("resnet18", num_classes=0)
    else:
        model = torchvision.models.resnet18()
        model.fc = torch.nn.Identity()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the README's two lines
    model.maxpool = torch.nn.Identity()
    model.load_state_dict(safetensors.torch.load_file(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_outputs(model.eval()(x), backbone(x))


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18"])
def test_without_batchnorm_round_trips_and_loads_with_identity_norm_layer(name, tmp_path):
    backbone = create_backbone(name, input_size=32, stem="default", batchnorm=False).eval()
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not norms and not backbone.batchnorm
    assert not any("bn" in key or "downsample.1" in key for key in backbone.model.state_dict())
    path = export_backbone(backbone, tmp_path)
    assert json.loads((tmp_path / "backbone.json").read_text())["batchnorm"] is False
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_backbone(path)(x), backbone(x))
        if name.startswith("timm:"):  # what the module docstring promises
            model = timm.create_model("resnet18", num_classes=0, norm_layer=nn.Identity,
                                      checkpoint_path=str(path)).eval()
        else:
            model = torchvision.models.resnet18(norm_layer=nn.Identity)
            model.fc = nn.Identity()
            model.load_state_dict(safetensors.torch.load_file(path))
        assert_same_outputs(model.eval()(x), backbone(x))


def test_removing_batchnorm_from_a_model_without_it_is_an_error():
    with pytest.raises(SSLPipelineError, match="no BatchNorm layers.*backbone.batchnorm: true"):
        create_backbone("timm:vit_tiny_patch16_224", img_size=32, input_size=32, batchnorm=False)


def test_torchvision_recipe_loads_our_export(tmp_path, monkeypatch):
    backbone = create_backbone("torchvision:resnet18", input_size=32, stem="default").eval()
    export_backbone(backbone, tmp_path)
    monkeypatch.chdir(tmp_path)
    # the three lines the README shows
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(safetensors.torch.load_file("backbone.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_outputs(model.eval()(x), backbone(x))


def test_export_record_and_atomic_files(tmp_path):
    backbone = create_backbone("timm:resnet18", in_chans=1, input_size=28)
    path = export_backbone(backbone, tmp_path / "run", metadata={"method": "simclr", "epochs": 2})
    record = json.loads((tmp_path / "run" / "backbone.json").read_text())
    assert path == tmp_path / "run" / "backbone.safetensors"
    assert record["format_version"] == 1
    assert (record["name"], record["source"], record["model"]) == (
        "timm:resnet18",
        "timm",
        "resnet18",
    )
    assert (record["stem"], record["in_chans"], record["input_size"]) == ("small", 1, 28)
    assert record["feature_dim"] == 512 and record["input_conv_rule"] == "small_stem"
    assert (record["method"], record["epochs"]) == ("simclr", 2)
    assert sorted(os.listdir(tmp_path / "run")) == ["backbone.json", "backbone.safetensors"]
    with pytest.raises(ValueError, match="name"):
        export_backbone(backbone, tmp_path, metadata={"name": "other"})


def test_third_party_pth_checkpoint_loads_with_a_warning(tmp_path):
    reference = timm.create_model("resnet18", num_classes=10).eval()  # with its fc classifier
    ddp_state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": ddp_state, "epoch": 90}, path)

    with pytest.warns(UserWarning, match="safetensors"):
        backbone = load_backbone(path, name="timm:resnet18")

    assert not backbone.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        assert_same_outputs(backbone(x), expected)


def test_third_party_safetensors_needs_a_name(tmp_path):
    reference = timm.create_model("resnet18", num_classes=0)
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(reference.state_dict(), path)
    with pytest.raises(SSLPipelineError, match="name="):
        load_backbone(path)
    assert_same_state(load_backbone(path, name="resnet18").model, reference)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    with pytest.raises(SSLPipelineError, match="lacks"):
        load_backbone(path, name="timm:resnet34")  # resnet18 has fewer blocks


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {shlex.quote(str(self.marker))}",))


@pytest.mark.filterwarnings("ignore:.*pickle-based")
def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    payload = _RunsCodeWhenUnpickled(marker)
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "payload": payload}, path)

    with pytest.raises(SSLPipelineError, match="pickled code"):
        load_backbone(path, name="timm:resnet18")
    assert not marker.exists()

    torch.load(path, weights_only=False)  # proof the file is live: a plain unpickle runs it
    assert marker.exists()


def test_missing_path_is_named(tmp_path):
    with pytest.raises(SSLPipelineError, match="nowhere"):
        load_backbone(tmp_path / "nowhere")
    with pytest.raises(SSLPipelineError, match="backbone.safetensors"):
        load_backbone(tmp_path)  # a directory without an export


@pytest.mark.parametrize(
    "name,suggestion",
    [
        ("timm:resnt18", "resnet18"),
        ("resnt18", "resnet18"),
        ("torchvision:alexnt", "alexnet"),
        ("torchvison:alexnet", "torchvision"),
    ],
)
def test_unknown_names_suggest_the_nearest(name, suggestion):
    with pytest.raises(SSLPipelineError, match=suggestion):
        create_backbone(name)


@pytest.mark.parametrize("name", ["timm:vgg11", "timm:mobilenetv3_small_100"])
def test_feature_dim_is_the_real_output_width(name):
    # timm's num_features is the width before the pre-logits layers these models keep
    backbone = create_backbone(name, input_size=32)
    assert backbone(torch.randn(2, 3, 32, 32)).shape[1] == backbone.feature_dim


def test_registry_lists_sources_and_modifiers():
    names = backbones.names()
    assert {"timm", "torchvision", "small_stem", "in_chans"} <= set(names)
    for entry in backbones:
        assert len(entry.description) > 30  # a useful one-liner, shown by `list backbones`


@pytest.mark.filterwarnings("ignore:.*pickle-based")
def test_the_cli_refuses_a_weights_file_that_runs_code_with_status_2(tmp_path, capsys, tiny_overrides):
    from ssl_pipeline.cli import main

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "payload": _RunsCodeWhenUnpickled(marker)},
               path)
    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    sets = [a for o in [*tiny_overrides, "backbone.name=timm:resnet18"] for a in ("--set", o)]
    status = main(["evaluate", str(recipe), "--backbone", str(path), "--quiet",
                   "--out", str(tmp_path / "run"), *sets])
    assert status == 2 and "pickled code" in capsys.readouterr().err
    assert not marker.exists()


# (in_size, kernel, stride, padding): 1x1 outputs (ResNet's last stage on tiny maps, its
# stride-2 entry and 1x1 shortcut, a 7x7 stem on one pixel), then other sizes, which take
# nn.Conv2d's own path
POINT_CASES = [(1, 3, 1, 1), (2, 3, 2, 1), (2, 1, 2, 0), (1, 1, 1, 0), (1, 7, 2, 3), (3, 3, 1, 0),
               (5, 5, 2, 0), (4, 3, 1, 1), (3, 3, 2, 1), (2, 3, 1, 1)]


@pytest.mark.parametrize("size, kernel, stride, padding", POINT_CASES)
@pytest.mark.parametrize("bias, channels_last", [(False, False), (True, True)])
def test_point_output_conv_is_the_same_convolution_with_the_same_gradients(
        size, kernel, stride, padding, bias, channels_last):
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 5, kernel, stride=stride, padding=padding, bias=bias).double()
    point = copy.deepcopy(plain)
    point_output_convs(point)
    assert type(point) is PointOutputConv2d and point.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 6, size, size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = plain(x1), point(x2)
    assert y1.shape == y2.shape
    torch.testing.assert_close(y2, y1)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(point.weight.grad, plain.weight.grad)
    if bias:
        torch.testing.assert_close(point.bias.grad, plain.bias.grad)
    with torch.no_grad():  # unbatched input, as nn.Conv2d takes it
        torch.testing.assert_close(point(x[0]), plain(x[0]))


def test_backbones_convert_plain_convs_only_and_export_unchanged_weights(tmp_path):
    backbone = create_backbone("timm:resnet18", in_chans=1, input_size=8)
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is PointOutputConv2d for m in convs)
    plain = timm.create_model("resnet18", num_classes=0, in_chans=1)
    plain.conv1, plain.maxpool = nn.Conv2d(1, 64, 3, 1, 1, bias=False), nn.Identity()
    plain.load_state_dict(backbone.model.state_dict())  # the same keys and shapes
    backbone.eval(), plain.eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(backbone(x), plain(x), rtol=1e-4, atol=1e-5)
    # grouped and dilated convs keep nn.Conv2d's own forward
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, dilation=2),
                          nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    assert all(type(m) is nn.Conv2d for m in point_output_convs(model))
