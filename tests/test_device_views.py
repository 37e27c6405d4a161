"""Views made on the training device: the same augmentations, with the same parameter
distributions, as the per-image lightly/torchvision path, drawn independently per image."""

import dataclasses
from pathlib import Path

import lightly.transforms.gaussian_blur as lightly_blur
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
import yaml
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from scipy.stats import ks_2samp
from torchvision.transforms.v2 import functional as TF

import ssl_pipeline
from ssl_pipeline.data.device_views import DeviceViews, ToUint8Tensor, adjust_hue
from ssl_pipeline.data.transforms import ViewSettings, crop_and_flips, fit_views, view_transform
from ssl_pipeline.methods import OptimSettings, methods

N = 3000  # draws per distribution: a KS test then tells 0.2 from 0.3 as the smallest crop
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def views_only(**probs) -> ViewSettings:
    """Settings with every random step off except `probs`; crops always the whole image."""
    off = dict(crop_min_scale=1.0, crop_max_scale=1.0, hflip_prob=0.0, vflip_prob=0.0,
               rotation_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
               solarize_prob=0.0)
    return dataclasses.replace(fit_views(64, 3, {}), **{**off, **probs})


def device_sample(views, n=N, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DeviceViews(views, size, ZERO, ONE).sample(n, size, size, "cpu", generator=g)


def steps_of(views, size=32):
    return view_transform(views, size, ZERO, ONE).transforms


# ---------------------------------------------------------------- parameter distributions


@pytest.mark.parametrize("size, channels", [(32, 3), (224, 3), (28, 1)])
def test_crop_boxes_match_torchvision_random_resized_crop(size, channels):
    views = fit_views(size, channels, {})
    crop = steps_of(views, size)[0]
    assert isinstance(crop, T.RandomResizedCrop)
    torch.manual_seed(0)
    image = Image.new("RGB", (size, size))
    boxes = [crop.make_params([image]) for _ in range(N)]
    ref_area = np.array([b["height"] * b["width"] for b in boxes]) / size**2
    ref_log_ratio = np.log([b["width"] / b["height"] for b in boxes])
    ref_left = np.array([b["left"] / (size - b["width"] + 1) for b in boxes])

    p = device_sample(views, size=size)
    top, left, height, width = (getattr(p, k).numpy().astype(np.float64)  # as the reference's
                                for k in ("top", "left", "height", "width"))
    area = height * width / size**2
    log_ratio = np.log(width / height)
    left = left / (size - width + 1)
    assert ks_2samp(area, ref_area).pvalue > 1e-3
    assert ks_2samp(log_ratio, ref_log_ratio).pvalue > 1e-3
    assert ks_2samp(left, ref_left).pvalue > 1e-3  # offsets uniform over the places that fit
    assert area.min() >= views.crop_min_scale - 2 / size and area.max() <= 1.0
    assert (top + height <= size).all() and (p.left + p.width <= size).all()

    # the same test catches a wrong range: smallest crop 0.3 of the image instead of 0.2
    wrong = device_sample(dataclasses.replace(views, crop_min_scale=views.crop_min_scale + 0.1),
                          size=size)
    assert ks_2samp((wrong.height * wrong.width / size**2).numpy(), ref_area).pvalue < 1e-6


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_color_jitter_factors_match_torchvision_color_jitter(strength):
    views = dataclasses.replace(fit_views(64, 3, {}), color_jitter_strength=strength)
    apply = steps_of(views)[4]
    assert isinstance(apply, T.RandomApply) and apply.p == views.color_jitter_prob
    jitter = apply.transforms[0]
    torch.manual_seed(0)
    ref = [jitter.make_params([]) for _ in range(N)]
    p = device_sample(views)
    for name in ("brightness", "contrast", "saturation", "hue"):
        ours = getattr(p, name).numpy()
        theirs = np.array([r[f"{name}_factor"] for r in ref])
        assert ks_2samp(ours, theirs).pvalue > 1e-3, name
        width = theirs.max() - theirs.min()
        assert abs(ours.min() - theirs.min()) < 0.01 * width, name  # the same range
        assert abs(ours.max() - theirs.max()) < 0.01 * width, name
    # the order of the four steps: a uniformly random permutation per image, like randperm
    first = np.bincount(p.order[:, 0].numpy(), minlength=4) / N
    ref_first = np.bincount([int(r["fn_idx"][0]) for r in ref], minlength=4) / N
    assert np.abs(first - 0.25).max() < 0.04 and np.abs(ref_first - 0.25).max() < 0.04
    assert len({tuple(o) for o in p.order.tolist()}) == 24


def test_blur_sigmas_match_lightlys_gaussian_blur(monkeypatch):
    views = fit_views(64, 3, {})
    blur = steps_of(views)[6]
    assert isinstance(blur, lightly_blur.GaussianBlur) and blur.prob == views.blur_prob
    radii = []
    real = lightly_blur.ImageFilter.GaussianBlur

    def recording(radius):
        radii.append(radius)
        return real(radius=radius)

    monkeypatch.setattr(lightly_blur.ImageFilter, "GaussianBlur", recording)
    np.random.seed(0)
    image = Image.new("RGB", (8, 8))
    for _ in range(N):
        blur(image)
    p = device_sample(views)
    sigma = p.sigma[p.blur].numpy()
    assert abs(len(radii) / N - views.blur_prob) < 0.03  # lightly's own rate, as a check
    assert ks_2samp(sigma, radii).pvalue > 1e-3
    assert sigma.min() >= views.blur_sigmas[0] and sigma.max() <= views.blur_sigmas[1]


# ---------------------------------------------------------------- rates, measured on the output


def ramp(channels: int, size: int = 8, axis: int = 1) -> np.ndarray:
    """uint8 image growing along `axis` (1: left to right), in every channel."""
    values = np.linspace(20, 230, size)
    plane = np.tile(values, (size, 1)) if axis == 1 else np.tile(values[:, None], (1, size))
    return np.repeat(plane[:, :, None], channels, axis=2).astype(np.uint8)


def colored(size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(1)
    base = np.array([170, 90, 130])
    return np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)


def checkerboard(size: int = 8) -> np.ndarray:
    board = (np.indices((size, size)).sum(0) % 2 * 255).astype(np.uint8)
    return np.repeat(board[:, :, None], 3, axis=2)


def flipped(x, source):
    return x[..., 0].mean((-2, -1)) > x[..., -1].mean((-2, -1))  # left brighter than right


def vflipped(x, source):
    return x[..., 0, :].mean((-2, -1)) > x[..., -1, :].mean((-2, -1))


def rotated(x, source):  # an x ramp rotated 90 degrees runs along y
    along_y = (x[..., 0, :] - x[..., -1, :]).abs().mean((-2, -1))
    return along_y > (x[..., 0] - x[..., -1]).abs().mean((-2, -1))


def changed(x, source):
    return (x - source).abs().flatten(1).max(1).values > 1.5 / 255


def gray(x, source):
    return (x - x.mean(1, keepdim=True)).abs().flatten(1).max(1).values < 1.5 / 255


def blurred(x, source):
    return x.flatten(1).std(1) < 0.8 * source.flatten(1).std(1)


def solarized(x, source):
    return x.flatten(1).mean(1) < 0.5  # the source is all above 128


EFFECTS = {  # setting -> (source image, detector)
    "hflip_prob": (ramp(3), flipped),
    "vflip_prob": (ramp(3, axis=0), vflipped),
    "rotation_prob": (ramp(3), rotated),
    "color_jitter_prob": (colored(), changed),
    "grayscale_prob": (colored(), gray),
    "blur_prob": (checkerboard(), blurred),
    "solarize_prob": (np.full((8, 8, 3), 200, np.uint8), solarized),
}


@pytest.mark.parametrize("setting", list(EFFECTS))
def test_each_step_is_applied_at_the_rate_of_the_per_image_path(setting):
    """Every step alone, on 2,000 images: the share of changed outputs is p in both paths.

    The device path makes all of them in one batch, so a parameter drawn once per batch would
    change all or none (rate 0 or 1)."""
    source, detect = EFFECTS[setting]
    p = 0.3
    views = views_only(**{setting: p}, blur_sigmas=(1.0, 2.0))  # wide enough to see at 8 px
    n, size = 2000, source.shape[0]
    x_source = torch.from_numpy(source).permute(2, 0, 1).float()[None] / 255

    torch.manual_seed(0)
    np.random.seed(0)
    per_image = view_transform(views, size, ZERO, ONE)
    image = Image.fromarray(source)
    theirs = detect(torch.stack([per_image(image) for _ in range(n)]), x_source).float().mean()

    batch = torch.from_numpy(source).permute(2, 0, 1)[None].repeat(n, 1, 1, 1)
    device_views = DeviceViews(views, size, ZERO, ONE, num_views=1)
    ours = detect(device_views(batch)[0], x_source).float().mean()
    tolerance = 4 * (p * (1 - p) / n) ** 0.5  # 0.04
    assert abs(theirs - p) < tolerance, f"per-image path: {theirs:.3f}"
    assert abs(ours - p) < tolerance, f"device path: {ours:.3f}"

    off = detect(DeviceViews(views_only(), size, ZERO, ONE, num_views=1)(batch)[0], x_source)
    assert not off.any()  # the detector sees nothing when the step is off


def test_every_image_and_every_view_draws_its_own_parameters():
    views = fit_views(224, 3, {"solarize_prob": 0.2, "vflip_prob": 0.5, "rotation_prob": 0.5})
    p = device_sample(views, n=64)
    for name in ("top", "left", "height", "width", "brightness", "contrast", "saturation",
                 "hue", "sigma"):
        values = getattr(p, name)
        assert len(set(values.tolist())) > 8, name  # not one draw for the batch
        assert values[0] != values[1] or values[0] != values[2], name
    for name in ("hflip", "vflip", "rotate", "jitter", "grayscale", "blur", "solarize"):
        coins = getattr(p, name)
        assert 0 < coins.sum() < len(coins), name
    torch.manual_seed(0)
    image = torch.from_numpy(colored(16)).permute(2, 0, 1)
    x0, x1 = DeviceViews(views, 16, ZERO, ONE)(image[None].repeat(8, 1, 1, 1))
    assert not torch.allclose(x0[0], x0[1])  # two copies of one image in a batch differ
    assert not torch.allclose(x0[0], x1[0])  # and so do the two views of an image


# ---------------------------------------------------------------- the operations themselves


def test_geometry_is_torchvisions_crop_resize_flip_rotate():
    views = fit_views(64, 3, {"vflip_prob": 0.5, "rotation_prob": 0.5})
    dv = DeviceViews(views, 24, ZERO, ONE)
    x = torch.rand(40, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    p = dv.sample(40, 24, 24, "cpu", generator=torch.Generator().manual_seed(1))
    out = dv.geometry(x, p)
    for i in range(40):
        ref = TF.resized_crop(x[i], int(p.top[i]), int(p.left[i]), int(p.height[i]),
                              int(p.width[i]), [24, 24], antialias=False)
        ref = TF.horizontal_flip(ref) if p.hflip[i] else ref
        ref = TF.vertical_flip(ref) if p.vflip[i] else ref
        ref = TF.rotate(ref, 90) if p.rotate[i] else ref
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_is_torchvisions_per_image_in_each_images_order(channels):
    views = views_only(color_jitter_prob=1.0)
    dv = DeviceViews(views, 12, ZERO, ONE)
    x = torch.rand(32, channels, 12, 12, generator=torch.Generator().manual_seed(0))
    p = device_sample(views, n=32, size=12)
    out = dv.color_jitter(x, p)
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [p.brightness, p.contrast, p.saturation, p.hue]
    for i in range(32):
        ref = x[i]
        for op in p.order[i].tolist():  # saturation and hue leave 1 channel as it is
            ref = adjust[op](ref, factors[op][i].item())
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_hue_rotation_is_torchvisions():
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0] = 0.5  # gray: no hue
    shift = torch.linspace(-0.5, 0.5, 16)
    out = adjust_hue(x, shift)
    for i in range(16):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], shift[i].item()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_is_pils_gaussian_blur(sigma):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    views = views_only(blur_prob=1.0, blur_sigmas=(sigma, sigma))
    dv = DeviceViews(views, 24, ZERO, ONE)
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    out = dv.blur(x, device_sample(views, n=1, size=24))[0]
    pil = Image.fromarray(image).filter(lightly_blur.ImageFilter.GaussianBlur(radius=sigma))
    ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    assert (out - ref).abs().mean() < 0.01  # PIL approximates the gaussian with box blurs
    assert (x[0] - ref).abs().mean() > 0.05


def test_solarize_grayscale_and_normalize():
    views = views_only(solarize_prob=1.0, grayscale_prob=1.0)
    x = torch.tensor([[0.2, 0.9], [0.4, 0.6], [0.6, 0.1]])[None, :, None].repeat(1, 1, 2, 1)
    # (1, 3, 2, 2): gray levels about 0.35 and 0.63 (solarized to 0.37)
    dv = DeviceViews(views, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = dv.apply(x.repeat(2, 1, 1, 1), device_sample(views, n=2, size=2))
    gray = TF.rgb_to_grayscale(x[0], 3)
    expected = torch.where(gray >= 128 / 255, 1 - gray, gray)
    torch.testing.assert_close(out[0], (expected - 0.5) / 0.5, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- workers and training


def test_workers_deliver_uint8_squares_at_the_view_size():
    to_tensor = ToUint8Tensor(16)
    square = to_tensor(Image.fromarray(colored(16)))
    assert square.dtype == torch.uint8 and square.shape == (3, 16, 16)
    assert torch.equal(square, torch.from_numpy(colored(16)).permute(2, 0, 1))
    assert to_tensor(Image.new("RGB", (40, 24))).shape == (3, 16, 16)  # short side, centre
    assert to_tensor(Image.new("L", (16, 16))).shape == (1, 16, 16)


class TinyBackbone(torch.nn.Module):
    feature_dim = 8

    def __init__(self, channels: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 3), torch.nn.BatchNorm2d(8),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, x):
        return self.net(x)


class BatchSpy(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch


@pytest.mark.parametrize("method, channels, precision", [("simclr", 3, "bf16-mixed"),
                                                         ("supervised", 1, "32")])
def test_the_training_step_gets_the_views_the_method_expects(method, channels, precision):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, channels, 12, 12), dtype=torch.uint8)
    labels = torch.arange(32) % 4
    loader = torch.utils.data.DataLoader(list(zip(images, labels)), batch_size=16)
    cls = methods.get(method).obj
    model = cls(TinyBackbone(channels), OptimSettings(epochs=1), num_classes=4)
    views = fit_views(12, channels, {})
    model.device_views = DeviceViews(crop_and_flips(views) if cls.needs_labels else views, 12,
                                     (0.5,) * channels, (0.25,) * channels, cls.num_views)
    spy = BatchSpy()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[spy])
    trainer.fit(model, loader)
    assert trainer.global_step == 2
    x, y = spy.batch
    for view in (x if cls.num_views > 1 else [x]):
        assert view.dtype == torch.float32 and view.shape == (16, channels, 12, 12)
        assert view.min() < -1  # normalized: (0 - 0.5) / 0.25 = -2 at black
    assert isinstance(x, list) == (cls.num_views > 1) and torch.equal(y, labels[16:])


def test_tiny_pretraining_run_with_views_on_the_device(tmp_path, tiny_overrides):
    recipe = Path(__file__).parents[1] / "recipes/quickstart.yaml"
    result = ssl_pipeline.run(recipe, out_dir=tmp_path / "run", quiet=True,
                              overrides=[*tiny_overrides, "stages=[pretrain]", "data.channels=1",
                                         "views.color_jitter_prob=0.8", "views.blur_prob=0.5",
                                         "trainer.channels_last=true"])
    pre = result.results["pretrain"]
    assert pre["steps"] > 0 and all(np.isfinite(pre["loss_by_epoch"]))
    resolved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())["resolved"]
    assert resolved["views"]["augment_on"] == "device" and resolved["precision"] == "32"


@pytest.mark.slow
def test_compiled_backbone_trains_and_exports_the_plain_weights(tmp_path, tiny_overrides):
    recipe = Path(__file__).parents[1] / "recipes/quickstart.yaml"
    result = ssl_pipeline.run(recipe, out_dir=tmp_path / "run", quiet=True,
                              overrides=[*tiny_overrides, "stages=[pretrain]", "pretrain.epochs=1",
                                         "trainer.compile=true",
                                         # timm's 0.4M-parameter ResNet: a smaller graph to compile
                                         "backbone.name=timm:test_resnet"])
    assert result.results["pretrain"]["steps"] > 0
    backbone = ssl_pipeline.load_backbone(result.run_dir)  # parameter names without _orig_mod
    assert backbone(torch.rand(2, 3, 16, 16)).shape == (2, 96)
