"""Image transforms: the two augmented views for self-supervised pretraining, the supervised
baseline's augmentation, and the deterministic evaluation transform.

The view settings are fitted to the data (`fit_views`) and built from lightly's transforms,
in the order of lightly's `SimCLRViewTransform` (solarization, when asked for, after the blur
as in BYOL). With `augment_on="device"` the same views are made batched on the training device
instead (data/device_views.py); these per-image transforms are then not used for pretraining.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.rotation import random_rotation_transform
from lightly.transforms.solarize import RandomSolarization
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.registry import nearest


@dataclass(frozen=True)
class ViewSettings:
    """Resolved augmentation parameters for one view (probabilities in [0, 1])."""

    crop_min_scale: float
    crop_max_scale: float
    hflip_prob: float
    vflip_prob: float
    rotation_prob: float  # rotation by 90 degrees, for data without an "up" (cells, satellites)
    color_jitter_prob: float
    color_jitter_strength: float  # scales lightly's brightness/contrast/saturation 0.8, hue 0.2
    grayscale_prob: float
    blur_prob: float
    blur_sigmas: tuple[float, float]
    solarize_prob: float
    # where the pretraining views are made: "device" (batched, on the training device, from
    # uint8 tensors the workers decode) or "workers" (these per-image transforms, on the CPU)
    augment_on: str = "device"


def fit_views(image_size: int, channels: int, overrides: dict) -> ViewSettings:
    """View settings fitted to the images; the overrides that are not None win.

    >>> fit_views(28, 1, {}).grayscale_prob, fit_views(28, 1, {"hflip_prob": 0.0}).hflip_prob
    (0.0, 0.0)
    """
    rgb, gray_or_rgb = channels == 3, channels in (1, 3)
    settings = ViewSettings(
        # SimCLR's ImageNet crops go down to 8% of the image; below 96 px such a crop is a
        # handful of pixels, so smaller images keep larger crops (MoCo/SimSiam use 0.2 on CIFAR)
        crop_min_scale=0.08 if image_size >= 96 else 0.2 if image_size >= 32 else 0.3,
        crop_max_scale=1.0,
        hflip_prob=0.5,
        vflip_prob=0.0,
        rotation_prob=0.0,
        # On gray images only the jitter's brightness and contrast act (saturation and hue do
        # nothing, and there is no color for grayscale to remove), and they are what makes
        # SimCLR's views hard enough there: Fashion-MNIST's views ablation (README) scored k-NN
        # 0.743 with them and 0.703 without, and the digits quickstart needs them too.
        color_jitter_prob=0.8 if gray_or_rgb else 0.0,  # (multispectral: no color steps at all)
        # SimCLR: strength 1.0 on ImageNet, 0.5 on CIFAR-size images (as lightly's docs advise)
        color_jitter_strength=1.0 if image_size >= 96 else 0.5,
        grayscale_prob=0.2 if rgb else 0.0,
        # SimCLR drops the blur on CIFAR (32 px): it wipes out the little detail there is
        blur_prob=0.5 if image_size > 32 else 0.0,
        blur_sigmas=(0.1, 2.0),
        solarize_prob=0.0,
    )
    fields = [f.name for f in dataclasses.fields(ViewSettings)]
    for key in overrides:
        if key not in fields:
            hint = nearest(key, fields)
            raise SSLPipelineError(
                f"unknown view setting {key!r}" + (f"; did you mean {hint!r}?" if hint else "")
                + f" Known: {', '.join(fields)}"
            )
    fitted = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if channels in (1, 3):
        return fitted
    # multispectral tensors: color steps are defined on RGB; views are made in the workers
    colored = {k: getattr(fitted, k) for k in ("color_jitter_prob", "grayscale_prob",
                                               "solarize_prob") if getattr(fitted, k) > 0}
    if colored:
        raise SSLPipelineError(
            f"views {', '.join(f'{k}={v}' for k, v in colored.items())} act on RGB colors, but "
            f"the images have {channels} bands; set them to 0 (crops, flips, rotations and "
            "blur work on any number of bands)"
        )
    return dataclasses.replace(fitted, augment_on="workers")


def view_transform(views: ViewSettings, image_size: int, mean, std) -> T.Compose:
    """One random view: PIL image (any size, L or RGB) -> tensor `(C, image_size, image_size)`.

    Multispectral float tensors `(C, H, W)` (C not 1 or 3) go through the same crop, flips and
    rotation (torchvision's transforms take tensors) and a tensor gaussian blur; their color
    steps are 0 (`fit_views`).
    """
    jitter = T.ColorJitter(
        brightness=0.8 * views.color_jitter_strength,
        contrast=0.8 * views.color_jitter_strength,
        saturation=0.8 * views.color_jitter_strength,
        hue=0.2 * views.color_jitter_strength,
    )
    steps = [
        T.RandomResizedCrop(image_size, scale=(views.crop_min_scale, views.crop_max_scale)),
        T.RandomHorizontalFlip(p=views.hflip_prob),
        T.RandomVerticalFlip(p=views.vflip_prob),
        random_rotation_transform(rr_prob=views.rotation_prob, rr_degrees=None),
        T.RandomApply([jitter], p=views.color_jitter_prob),
        T.RandomGrayscale(p=views.grayscale_prob),
        GaussianBlur(sigmas=views.blur_sigmas, prob=views.blur_prob) if len(mean) in (1, 3)
        else T.RandomApply([T.GaussianBlur(blur_kernel(views.blur_sigmas[1], image_size),
                                           sigma=views.blur_sigmas)], p=views.blur_prob),
    ]
    # only when used: without it the views match lightly's SimCLRViewTransform draw for draw
    if views.solarize_prob > 0:
        steps.append(RandomSolarization(prob=views.solarize_prob))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])


def blur_kernel(max_sigma: float, image_size: int) -> int:
    """Odd kernel side covering 3 sigma each way, at most the image side.

    >>> blur_kernel(2.0, 64), blur_kernel(2.0, 8)
    (13, 7)
    """
    side = 2 * math.ceil(3 * max_sigma) + 1
    return min(side, image_size - 1 + image_size % 2)


def ssl_views_transform(views: ViewSettings, image_size: int, mean, std) -> MultiViewTransform:
    """Two independently augmented views of an image: a list of 2 tensors `(C, S, S)`."""
    view = view_transform(views, image_size, mean, std)
    return MultiViewTransform([view, view])


def eval_transform(image_size: int, mean, std, crop_pct: float = 1.0) -> T.Compose:
    """Deterministic: resize the short side to image_size / crop_pct, center-crop image_size."""
    return T.Compose(
        [
            T.Resize(int(image_size / crop_pct)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def crop_and_flips(views: ViewSettings) -> ViewSettings:
    """The supervised baseline's share of the view settings: crop and flips, nothing else."""
    return dataclasses.replace(views, rotation_prob=0.0, color_jitter_prob=0.0,
                               grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


def supervised_train_transform(views: ViewSettings, image_size: int, mean, std) -> T.Compose:
    """The supervised baseline's standard augmentation: random resized crop and flips only."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(views.crop_min_scale, views.crop_max_scale)),
            T.RandomHorizontalFlip(p=views.hflip_prob),
            T.RandomVerticalFlip(p=views.vflip_prob),
            T.ToTensor(),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )
