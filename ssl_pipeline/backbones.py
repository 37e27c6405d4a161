"""Backbones: an image batch in, pooled features `(B, feature_dim)` out, preprocessing attached.

Names. `"timm:<model>"` (or a bare `"<model>"`) is any timm model, built headless with
`timm.create_model(model, num_classes=0, in_chans=..., **model_kwargs)`. `"torchvision:<model>"`
is any torchvision classification model with its classifier replaced by `nn.Identity`: `fc`
(ResNet, GoogLeNet, Inception, RegNet, ShuffleNet), `classifier` (AlexNet, VGG, DenseNet,
MobileNet, EfficientNet, MNASNet), `heads` (ViT), `head` (Swin). Pooling, flatten and norm layers
inside a `classifier` Sequential stay, so ConvNeXt keeps its LayerNorm and MaxViT and SqueezeNet
keep their pooling; `Backbone.removed_head` lists the modules that became Identity.
Models with a fixed image size take it as a keyword: `img_size=32` (timm ViT, DeiT, BoTNet) or
`image_size=32` (torchvision ViT).

Input channels (`in_chans != 3`). timm builds the model for `in_chans` itself. For torchvision
the first `Conv2d` is replaced by one with `in_chans` inputs. When that conv holds pretrained RGB
filters they are adapted with timm's rule (`timm.models.adapt_input_conv`): 1 channel gets the
sum of the R, G and B filters; C channels get the RGB filters repeated cyclically (R, G, B, R,
...) and scaled by 3/C, which keeps the first layer's output near the pretrained scale.
Without pretrained weights the new conv has PyTorch's default initialization.
`Backbone.input_conv_rule` records which rule applied, one of `INPUT_CONV_RULES`.

Normalization. Unless `mean`/`std` are given, they come from the model's pretrained config
(timm) or weights (torchvision), which are RGB values; `broadcast_stats` turns them into
`in_chans` values by the same rule: 1 channel gets the average, C channels the values repeated
cyclically. Explicit `mean`/`std` must have 1 value (repeated) or `in_chans` values.

Small images (`stem="small"`). ResNet-family models (anything with `conv1`, `bn1` and `maxpool`:
resnet*, seresnet*, resnext*, wide_resnet*, from timm or torchvision) get the CIFAR-style stem: a
3x3 stride-1 `conv1` and no max-pool, which keeps 28-64 px images from shrinking to 1-2 px
before the last stage. timm's deep stems (resnet10t, resnet50d: `conv1` is a Sequential of three
convs) are replaced by the same single 3x3 conv. `stem="auto"` picks it when `input_size <= 64`.

Without BatchNorm (`batchnorm=False`, for ablations). Every BatchNorm layer becomes `nn.Identity`,
the structure timm and torchvision build when given `norm_layer=torch.nn.Identity`: ResNet exports
load with `timm.create_model(model, num_classes=0, norm_layer=torch.nn.Identity, ...)`.

Export. `export_backbone` writes `backbone.safetensors` (the headless model's state dict, nothing
else) and `backbone.json` (how to rebuild it). The weights load without this package: with
`timm.create_model(model, num_classes=0, checkpoint_path="backbone.safetensors")` for timm
models with the default stem, and like this for torchvision:

>>> import os, tempfile
>>> import safetensors.torch, torch, torchvision
>>> previous_dir = os.getcwd()
>>> os.chdir(tempfile.mkdtemp())
>>> _ = export_backbone(create_backbone("torchvision:resnet18"), Path("."))
>>> model = torchvision.models.resnet18()
>>> model.fc = torch.nn.Identity()
>>> model.load_state_dict(safetensors.torch.load_file("backbone.safetensors"))
<All keys matched successfully>
>>> os.chdir(previous_dir)
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import timm
import torch
import torchvision
from timm.models import adapt_input_conv, clean_state_dict
from torch import Tensor, nn
from torch.nn import functional as F

from ssl_pipeline.atomic import write_atomic
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.names import BACKBONE_DESCRIPTIONS
from ssl_pipeline.registry import Registry, nearest

# "timm" and "torchvision" build headless models (kind="source"); the other entries are the
# modifications create_backbone applies on top (kind="modifier"), listed so users can find them.
# Their descriptions live in names.py, where `ssl-pipeline list backbones` reads them.
backbones: Registry = Registry("backbone")

FORMAT_VERSION = 1
WEIGHTS_FILE = "backbone.safetensors"
RECORD_FILE = "backbone.json"

INPUT_CONV_RULES = {
    "none": "in_chans == 3: the model's own first conv",
    "adapt_input_conv": "pretrained RGB filters adapted by timm.models.adapt_input_conv "
    "(1 channel: sum of RGB; C channels: RGB repeated cyclically, scaled by 3/C)",
    "random_init": "first conv built for in_chans with random weights (nothing to adapt)",
    "small_stem": "first conv replaced by the small stem's fresh 3x3 conv",
}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What images must look like on the way in: square side, channels, normalization."""

    input_size: int  # square side in px
    in_chans: int
    mean: tuple[float, ...]  # one per channel
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise SSLPipelineError(
                f"mean {self.mean} and std {self.std} need one value per channel "
                f"(in_chans={self.in_chans})"
            )

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclasses.dataclass
class HeadlessModel:
    """What a source builder hands to `create_backbone`: the model and its defaults."""

    model: nn.Module
    input_size: int
    mean: tuple[float, ...]  # RGB values from the pretrained config, before broadcasting
    std: tuple[float, ...]
    removed_head: tuple[str, ...]
    input_conv_rule: str


class PointOutputConv2d(nn.Conv2d):
    """An `nn.Conv2d` that computes a 1x1 output as one matrix product.

    When a convolution's output is a single position, it is a linear map of the few input
    positions its kernel covers; the other taps see only zero padding. oneDNN's CPU backward
    handles that case badly: for ResNet-18's last stage on 8 px images (3x3 convs on 1x1
    maps), one conv's backward took 70 ms against 2.7 ms for its forward, and a whole training
    step 398 ms of backward against 62 ms of forward (Zen 3, fp32, batch 128). As a matrix
    product over the covered taps the same step ran 1.6x faster. The result is the same
    convolution (it differs by float rounding), the parameters and the state dict are the
    `nn.Conv2d`'s, and every other output size takes the usual path.
    """

    def forward(self, x: Tensor) -> Tensor:
        (h, w), (kh, kw), (sh, sw), (ph, pw) = x.shape[-2:], self.kernel_size, self.stride, self.padding
        if x.dim() != 4 or (h + 2 * ph - kh) // sh != 0 or (w + 2 * pw - kw) // sw != 0:
            return super().forward(x)  # unbatched (C, H, W) input, or an output larger than 1x1
        rows, cols = min(h, kh - ph), min(w, kw - pw)  # the input positions the output sees
        weight = self.weight[:, :, ph:ph + rows, pw:pw + cols]
        out = F.linear(x[:, :, :rows, :cols].flatten(1), weight.flatten(1), self.bias)
        return out[:, :, None, None]


def point_output_convs(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with its plain convolutions computing 1x1 outputs as matrix
    products (`PointOutputConv2d`); grouped, dilated and non-zero-padded convs keep theirs."""
    for module in model.modules():
        if (type(module) is nn.Conv2d and module.groups == 1 and module.dilation == (1, 1)
                and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
            module.__class__ = PointOutputConv2d
    return model


class Backbone(nn.Module):
    """A headless image model: `(B, in_chans, S, S)` in, `(B, feature_dim)` out.

    `model` is the timm/torchvision model without its classifier; its state dict is what
    `export_backbone` writes. `feature_dim` is measured by a forward pass, because timm's
    `num_features` is not what comes out for some models (VGG, MobileNetV3).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        preprocessing: Preprocessing,
        *,
        stem: str = "default",
        input_conv_rule: str = "none",
        removed_head: tuple[str, ...] = (),
        model_kwargs: dict[str, Any] | None = None,
        batchnorm: bool = True,
    ):
        super().__init__()
        self.batchnorm = batchnorm
        self.name = name
        self.source, self.model_name = name.split(":", 1)
        self.model = point_output_convs(model)
        self.preprocessing = preprocessing
        self.stem = stem
        self.input_conv_rule = input_conv_rule
        self.removed_head = removed_head
        self.model_kwargs = dict(model_kwargs or {})
        self.feature_dim = self._measure_feature_dim()

    def forward(self, x: Tensor) -> Tensor:
        # torchvision models whose head became Identity may return (B, C, 1, 1)
        return self.model(x).flatten(1)  # (B, feature_dim)

    @torch.no_grad()
    def _measure_feature_dim(self) -> int:
        was_training = self.training
        self.eval()  # batch of 1: BatchNorm must use running stats
        p = self.preprocessing
        try:
            out = self(torch.zeros(1, p.in_chans, p.input_size, p.input_size))
        except RuntimeError as e:
            raise SSLPipelineError(
                f"{self.name} cannot run on {p.input_size}x{p.input_size} images ({e}); "
                "give a larger input_size, or img_size=... for fixed-size models such as ViT"
            ) from e
        finally:
            self.train(was_training)
        return out.shape[1]


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    input_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    stem: str = "auto",
    pretrained: bool = False,
    batchnorm: bool = True,
    **model_kwargs: Any,
) -> Backbone:
    """Build a headless backbone; see the module docstring for names, channels and stems.

    >>> backbone = create_backbone("timm:resnet18", in_chans=1, input_size=28)
    >>> backbone.stem, backbone.feature_dim, backbone.preprocessing.mean
    ('small', 512, (0.449,))
    >>> backbone(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 512])
    """
    if not isinstance(in_chans, int) or in_chans < 1:
        raise SSLPipelineError(f"in_chans must be a positive integer, got {in_chans!r}")
    source, model_name = split_name(name)
    built = backbones.get(source).obj(
        model_name, in_chans=in_chans, pretrained=pretrained, **model_kwargs
    )
    name = f"{source}:{model_name}"
    stem = resolve_stem(stem, built.model, input_size, name)
    if stem == "small":
        use_small_stem(built.model, in_chans)
    if not batchnorm:
        remove_batchnorm(built.model, name)
    preprocessing = Preprocessing(
        input_size=int(input_size or built.input_size),
        in_chans=in_chans,
        mean=_stats(mean, built.mean, in_chans, "mean"),
        std=_stats(std, built.std, in_chans, "std"),
    )
    return Backbone(
        name,
        built.model,
        preprocessing,
        stem=stem,
        input_conv_rule="small_stem" if stem == "small" else built.input_conv_rule,
        removed_head=built.removed_head,
        model_kwargs=model_kwargs,
        batchnorm=batchnorm,
    )


def remove_batchnorm(model: nn.Module, name: str) -> None:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm) becomes `nn.Identity`, in place."""
    found = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not found:
        raise SSLPipelineError(f"{name} has no BatchNorm layers to remove; set "
                               "backbone.batchnorm: true (the default) for this model")
    for dotted in found:
        _set_submodule(model, dotted, nn.Identity())


def split_name(name: str) -> tuple[str, str]:
    """`"timm:resnet18"` -> `("timm", "resnet18")`; a bare name means timm."""
    source, sep, model_name = name.partition(":")
    if not sep:
        return "timm", name
    if backbones.get(source).extra.get("kind") != "source":
        raise SSLPipelineError(f"{name!r}: backbone names start with 'timm:' or 'torchvision:'")
    return source, model_name


def _unknown_model(model_name: str, choices: list[str], source: str) -> SSLPipelineError:
    hint = nearest(model_name, choices)
    did_you_mean = f"; did you mean '{source}:{hint}'?" if hint else ""
    return SSLPipelineError(
        f"unknown {source} model {model_name!r}{did_you_mean} "
        f"(`{source}.models.list_models()` lists them all)"
    )


def _call_builder(name: str, build: Callable[..., nn.Module], *args: Any, **kwargs: Any):
    try:
        return build(*args, **kwargs)
    except TypeError as e:  # a model_kwargs typo (img_size for a ResNet) surfaces deep inside
        raise SSLPipelineError(f"{name} does not accept these model arguments: {e}") from e
    except OSError as e:  # only pretrained weights touch the network or the disk cache
        raise SSLPipelineError(
            f"could not get the pretrained weights of {name} ({e}); they download on first "
            "use, so this needs internet or a cached copy"
        ) from e


@backbones.register("timm", BACKBONE_DESCRIPTIONS["timm"], kind="source")
def build_timm(
    model_name: str, *, in_chans: int, pretrained: bool, **model_kwargs
) -> HeadlessModel:
    if not timm.is_model(model_name):  # also accepts pretrained tags: "resnet50.a1_in1k"
        raise _unknown_model(model_name, timm.list_models(), "timm")
    model = _call_builder(
        f"timm:{model_name}",
        timm.create_model,
        model_name,
        pretrained=pretrained,
        num_classes=0,
        in_chans=in_chans,
        **model_kwargs,
    )
    cfg = model.pretrained_cfg
    classifier = cfg.get("classifier") or ()
    return HeadlessModel(
        model,
        input_size=_side(model_kwargs.get("img_size", cfg["input_size"])),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        removed_head=(classifier,) if isinstance(classifier, str) else tuple(classifier),
        # timm itself builds the conv for in_chans, adapting pretrained weights by the same rule
        input_conv_rule=_conv_rule(in_chans, pretrained),
    )


@backbones.register("torchvision", BACKBONE_DESCRIPTIONS["torchvision"], kind="source")
def build_torchvision(
    model_name: str, *, in_chans: int, pretrained: bool, **model_kwargs
) -> HeadlessModel:
    names = torchvision.models.list_models(module=torchvision.models)
    if model_name not in names:
        raise _unknown_model(model_name, names, "torchvision")
    if model_name in ("googlenet", "inception_v3") and not pretrained:
        # aux heads only matter for supervised training; init_weights=True silences a warning
        model_kwargs = {"aux_logits": False, "init_weights": True, **model_kwargs}
    model = _call_builder(
        f"torchvision:{model_name}",
        torchvision.models.get_model,
        model_name,
        weights="DEFAULT" if pretrained else None,
        **model_kwargs,
    )
    _drop_aux_heads(model)
    removed_head = remove_torchvision_head(model)
    rule = "none"
    if in_chans != 3:
        rule = replace_input_conv(model, in_chans, adapt_weights=pretrained)
        if hasattr(model, "transform_input"):  # GoogLeNet/Inception re-normalize x[:, :3] as RGB
            model.transform_input = False
    input_size, mean, std = _torchvision_defaults(model_name, model_kwargs)
    return HeadlessModel(model, input_size, mean, std, removed_head, rule)


def _drop_aux_heads(model: nn.Module) -> None:
    # pretrained Inception-v3 keeps its auxiliary classifier: get_model refuses aux_logits=False
    # together with weights
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for attr in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, attr):
                setattr(model, attr, None)


def _torchvision_defaults(model_name: str, model_kwargs: dict) -> tuple[int, tuple, tuple]:
    # the weights' preset transform holds the evaluation crop and normalization; building the
    # transform downloads nothing
    preset = torchvision.models.get_model_weights(model_name).DEFAULT.transforms()
    size = model_kwargs.get("image_size", preset.crop_size)
    return _side(size), tuple(preset.mean), tuple(preset.std)


_HEAD_ATTRS = ("fc", "classifier", "heads", "head")
# layers in a classifier Sequential that shape features rather than classify them
_KEEP_IN_HEAD = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.LayerNorm)


def remove_torchvision_head(model: nn.Module) -> tuple[str, ...]:
    """Replace a torchvision model's classifier by Identity; returns the replaced module names.

    Inside a Sequential classifier, pooling, flatten and LayerNorm layers stay (ConvNeXt's
    norm, MaxViT's and SqueezeNet's pooling) so the features stay pooled and normalized.
    """
    attr = next((a for a in _HEAD_ATTRS if isinstance(getattr(model, a, None), nn.Module)), None)
    if attr is None:
        raise SSLPipelineError(
            f"cannot find the classifier of {type(model).__name__} (looked for {_HEAD_ATTRS})"
        )
    head = getattr(model, attr)
    if not isinstance(head, nn.Sequential) or not any(isinstance(m, _KEEP_IN_HEAD) for m in head):
        setattr(model, attr, nn.Identity())
        return (attr,)
    removed = []
    for i, layer in enumerate(head):
        if not isinstance(layer, _KEEP_IN_HEAD):
            head[i] = nn.Identity()
            removed.append(f"{attr}.{i}")
    return tuple(removed)


@backbones.register("in_chans", BACKBONE_DESCRIPTIONS["in_chans"], kind="modifier")
def replace_input_conv(model: nn.Module, in_chans: int, *, adapt_weights: bool) -> str:
    """Swap the model's first Conv2d for one with `in_chans` inputs; returns the rule applied.

    With `adapt_weights` the new conv gets the old RGB filters adapted by timm's rule (1
    channel: their sum; C channels: repeated cyclically, times 3/C); else a fresh init.
    """
    weight = first_conv(model).weight.detach()
    swap_first_conv(model, in_chans, adapt_input_conv(in_chans, weight) if adapt_weights else None)
    return _conv_rule(in_chans, adapt_weights)


def fit_input_channels(backbone: Backbone, channels: int, data_mean=None, data_std=None) -> str:
    """Adapt a loaded backbone to images with `channels` channels, in place; returns the rule.

    For evaluating weights on data with another channel count (a gray-pretrained backbone on
    RGB, RGB weights on 13 bands). The first convolution's filters W (out, I, k, k) become:

    - 1 channel from I: their sum over the I inputs (a gray image repeated into I channels
      gives the same response as before);
    - C channels from 1: W repeated C times, divided by C (an image whose C channels are equal
      gives the same response);
    - C > 3 channels from RGB: the RGB filters repeated cyclically (R, G, B, R, ...), times
      3/C (timm's adapt_input_conv).

    Normalization: gray and RGB take the backbone's statistics averaged or repeated; other
    channel counts take the data's own per-channel statistics (the backbone's describe other
    bands). Any other pairing (13 bands to RGB weights' 1...) is an error.
    """
    p = backbone.preprocessing
    source = p.in_chans
    if source == channels:
        return "none"
    weight = first_conv(backbone.model).weight.detach()
    if channels == 1:
        new_weight, rule = weight.sum(dim=1, keepdim=True), f"{source}->1: filters summed"
    elif source == 1:
        new_weight = weight.repeat(1, channels, 1, 1) / channels
        rule = f"1->{channels}: filters repeated, divided by {channels}"
    elif source == 3:
        new_weight = adapt_input_conv(channels, weight)
        rule = f"3->{channels}: RGB filters repeated cyclically, times 3/{channels}"
    else:
        raise SSLPipelineError(
            f"the backbone takes {source}-channel images and the data has {channels}; there is "
            "no rule to adapt between them. Evaluate on data with the backbone's bands (for "
            "EuroSAT: data.eurosat.bands), or pretrain on this data"
        )
    swap_first_conv(backbone.model, channels, new_weight)
    if channels in (1, 3) or data_mean is None:
        mean, std = broadcast_stats(p.mean, channels), broadcast_stats(p.std, channels)
        rule += "; normalization: the backbone's, " + ("averaged" if channels == 1 else "repeated")
    else:
        mean, std = tuple(data_mean), tuple(data_std)
        rule += "; normalization: the data's per-channel statistics"
    backbone.preprocessing = dataclasses.replace(p, in_chans=channels, mean=mean, std=std)
    backbone.input_conv_rule = f"{backbone.input_conv_rule}, then at evaluation {rule}"
    return rule


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def swap_first_conv(model: nn.Module, in_chans: int, weight: Tensor | None) -> None:
    """The model's first Conv2d replaced by one with `in_chans` inputs and otherwise the same
    settings: `weight` (and the old bias) copied in, or a fresh init when `weight` is None."""
    conv_name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new_conv = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode)
    if weight is not None:
        with torch.no_grad():
            new_conv.weight.copy_(weight)
            if conv.bias is not None:
                new_conv.bias.copy_(conv.bias)
    _set_submodule(model, conv_name, new_conv.to(conv.weight.device))


def _conv_rule(in_chans: int, pretrained: bool) -> str:
    if in_chans == 3:
        return "none"
    return "adapt_input_conv" if pretrained else "random_init"


def _set_submodule(model: nn.Module, dotted_name: str, module: nn.Module) -> None:
    parent_name, _, leaf = dotted_name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def is_resnet_family(model: nn.Module) -> bool:
    """Models the small stem applies to: ResNets from timm or torchvision.

    They have `conv1`, `bn1` and `maxpool`; ShuffleNet has `conv1` and `maxpool` too, but its
    `conv1` holds its own BatchNorm, so swapping it for a bare conv would drop that norm.
    """
    return all(hasattr(model, a) for a in ("conv1", "bn1", "maxpool"))


def resolve_stem(stem: str, model: nn.Module, input_size: int | None, name: str) -> str:
    """`"auto"` -> `"small"` for ResNet-family models at `input_size <= 64`, else `"default"`."""
    if stem not in ("auto", "default", "small"):
        raise SSLPipelineError(f"stem must be 'auto', 'default' or 'small', got {stem!r}")
    if stem == "auto":
        small = is_resnet_family(model) and input_size is not None and input_size <= 64
        return "small" if small else "default"
    if stem == "small" and not is_resnet_family(model):
        raise SSLPipelineError(
            f"stem='small' works only for ResNet-family models (conv1, bn1, maxpool: resnet*, "
            f"seresnet*, resnext*, wide_resnet*, from timm or torchvision), not {name}; "
            "use stem='default'"
        )
    return stem


@backbones.register("small_stem", BACKBONE_DESCRIPTIONS["small_stem"], kind="modifier")
def use_small_stem(model: nn.Module, in_chans: int) -> None:
    """CIFAR-style stem: conv1 becomes a 3x3 stride-1 conv and the max-pool goes."""
    # timm's deep stems are a Sequential of convs; the last one sets the width bn1 expects
    convs = [m for m in model.conv1.modules() if isinstance(m, nn.Conv2d)]
    model.conv1 = nn.Conv2d(in_chans, convs[-1].out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def broadcast_stats(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """RGB mean or std for `in_chans` channels: 1 channel averages, more repeat cyclically.

    >>> broadcast_stats((0.485, 0.456, 0.406), 1)
    (0.449,)
    >>> broadcast_stats((0.1, 0.2, 0.3), 5)
    (0.1, 0.2, 0.3, 0.1, 0.2)
    """
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_chans))


def _stats(given, default: tuple[float, ...], in_chans: int, what: str) -> tuple[float, ...]:
    if given is None:
        return broadcast_stats(default, in_chans)
    given = tuple(float(v) for v in given)
    if len(given) not in (1, in_chans):
        raise SSLPipelineError(
            f"{what} has {len(given)} values but in_chans={in_chans}; give 1 or {in_chans}"
        )
    return broadcast_stats(given, in_chans)


def _side(size: int | tuple | list) -> int:
    """Square side from an int, `(H, W)` or timm's `(C, H, W)`."""
    if isinstance(size, int):
        return size
    height, width = size[-2:] if len(size) >= 2 else (size[0], size[0])
    if height != width:
        raise SSLPipelineError(f"only square inputs are supported, got {height}x{width}")
    return int(height)


def backbone_record(backbone: Backbone) -> dict[str, Any]:
    """What `backbone.json` holds: everything needed to rebuild the architecture."""
    p = backbone.preprocessing
    return {
        "format_version": FORMAT_VERSION,
        "name": backbone.name,
        "source": backbone.source,
        "model": backbone.model_name,
        "stem": backbone.stem,
        "batchnorm": backbone.batchnorm,
        "in_chans": p.in_chans,
        "feature_dim": backbone.feature_dim,
        "input_size": p.input_size,
        "mean": list(p.mean),
        "std": list(p.std),
        "model_kwargs": backbone.model_kwargs,
        "input_conv_rule": backbone.input_conv_rule,
        "removed_head": list(backbone.removed_head),
    }


def export_backbone(backbone: Backbone, out_dir: Path, metadata: dict | None = None) -> Path:
    """Write `backbone.safetensors` and `backbone.json` to `out_dir`; returns the weights path.

    `metadata` (method, epochs, git commit, versions) is added to the json. Each file is
    written beside its final name and renamed, so readers never see half a file.
    """
    record = backbone_record(backbone)
    clash = set(record) & set(metadata or {})
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} would overwrite the backbone record")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy
    state = backbone.model.state_dict()
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    weights = out_dir / WEIGHTS_FILE
    write_atomic(weights, lambda tmp: safetensors.torch.save_file(tensors, tmp, {"format": "pt"}))
    text = json.dumps({**record, **(metadata or {})}, indent=2) + "\n"
    write_atomic(out_dir / RECORD_FILE, lambda tmp: Path(tmp).write_text(text))
    return weights


def load_backbone(path: str | Path, name: str | None = None, **create_kwargs: Any) -> Backbone:
    """Load our export (a run or export directory, or its .safetensors) or third-party weights.

    Third-party files (.safetensors without a json beside, .pth/.pt/.bin) need `name`;
    `create_kwargs` go to `create_backbone`. The backbone comes back in eval mode.
    """
    weights = _find_weights(Path(path))
    record_path = weights.with_suffix(".json")
    if weights.suffix == ".safetensors" and record_path.is_file():
        backbone = _load_export(weights, record_path, name, create_kwargs)
    else:
        backbone = _load_third_party(weights, name, create_kwargs)
    return backbone.eval()


def _find_weights(path: Path) -> Path:
    if not path.exists():
        raise SSLPipelineError(f"no backbone at {path}: the path does not exist")
    if path.is_file():
        return path
    found = sorted(path.rglob(WEIGHTS_FILE))
    if len(found) != 1:
        what = "none" if not found else ", ".join(str(f) for f in found)
        raise SSLPipelineError(
            f"expected one {WEIGHTS_FILE} under {path}, found {what}; pass the file itself"
        )
    return found[0]


def _load_export(weights: Path, record_path: Path, name: str | None, create_kwargs: dict):
    record = json.loads(record_path.read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise SSLPipelineError(
            f"{record_path} has format_version {record.get('format_version')!r}; this "
            f"ssl_pipeline reads {FORMAT_VERSION}: upgrade ssl_pipeline"
        )
    if name is not None and ":".join(split_name(name)) != record["name"]:
        raise SSLPipelineError(f"{weights} holds {record['name']}, not {name}")
    kwargs = {
        "in_chans": record["in_chans"],
        "input_size": record["input_size"],
        "mean": tuple(record["mean"]),
        "std": tuple(record["std"]),
        "stem": record["stem"],
        "batchnorm": record.get("batchnorm", True),
        **record["model_kwargs"],
        **create_kwargs,
    }
    backbone = create_backbone(record["name"], **kwargs)
    state = safetensors.torch.load_file(weights)
    try:
        backbone.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SSLPipelineError(f"{weights} does not fit {record['name']}: {e}") from e
    return backbone


def _load_third_party(weights: Path, name: str | None, create_kwargs: dict) -> Backbone:
    if name is None:
        raise SSLPipelineError(
            f"{weights} has no {RECORD_FILE} beside it, so its architecture is unknown; "
            f"pass name=, e.g. load_backbone({str(weights)!r}, name='timm:resnet18')"
        )
    state = read_state_dict(weights)
    backbone = create_backbone(name, **create_kwargs)
    load_foreign_state(backbone, state, weights)
    return backbone


def read_state_dict(weights: Path) -> dict[str, Tensor]:
    """Tensors from a .safetensors file, or from a PyTorch file without running pickled code."""
    if weights.suffix == ".safetensors":
        return safetensors.torch.load_file(weights)
    warnings.warn(
        f"{weights} is a pickle-based PyTorch file, read with torch.load(weights_only=True); "
        "safetensors is safer (it cannot carry code): convert it with safetensors.torch.save_file",
        UserWarning,
        stacklevel=4,
    )
    try:
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln), str(e)[:200])
        raise SSLPipelineError(
            f"refused {weights}: it contains pickled code, not just tensors ({blocked.strip()}), "
            "which would run when unpickled. If you trust its origin, load it yourself and "
            "save the state dict with safetensors.torch.save_file, then load that file"
        ) from e
    except (RuntimeError, KeyError, EOFError, ValueError) as e:
        raise SSLPipelineError(f"cannot read {weights} as a PyTorch weights file: {e!r}") from e
    return _unwrap_state_dict(checkpoint, weights)


def _unwrap_state_dict(checkpoint: Any, weights: Path) -> dict[str, Tensor]:
    # training checkpoints nest the weights under "state_dict" or "model"
    while isinstance(checkpoint, dict) and not _is_state_dict(checkpoint):
        nested = [k for k in ("state_dict", "model") if isinstance(checkpoint.get(k), dict)]
        key = nested[0] if nested else None
        if key is None:
            raise SSLPipelineError(
                f"{weights} holds no state dict (no 'state_dict' or 'model' entry); "
                f"top-level keys: {sorted(map(str, checkpoint))[:10]}"
            )
        checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise SSLPipelineError(f"{weights} holds a {type(checkpoint).__name__}, not a state dict")
    return clean_state_dict(checkpoint)  # strips DDP's "module." and torch.compile's "_orig_mod."


def _is_state_dict(checkpoint: dict) -> bool:
    return all(isinstance(v, Tensor) for v in checkpoint.values())


def load_foreign_state(backbone: Backbone, state: dict[str, Tensor], source: Path) -> None:
    """Load third-party weights, dropping the classifier the headless model no longer has."""
    own = backbone.model.state_dict().keys()
    head = tuple(f"{h}." for h in backbone.removed_head)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(head)}
    try:
        result = backbone.model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise SSLPipelineError(f"{source} does not fit {backbone.name}: {e}") from e
    if result.missing_keys:
        raise SSLPipelineError(
            f"{source} lacks {len(result.missing_keys)} weights of {backbone.name}, e.g. "
            f"{result.missing_keys[:5]}; its own keys look like {list(state)[:5]}. "
            "Is it a checkpoint of another architecture, or with another stem?"
        )
    if result.unexpected_keys:
        warnings.warn(
            f"ignored {len(result.unexpected_keys)} entries of {source} that {backbone.name} "
            f"does not have: {result.unexpected_keys[:10]}",
            UserWarning,
            stacklevel=3,
        )
