"""SSL views made on the training device, batched, with independent random parameters per image.

Two-view SSL on GPUs is limited by the CPU that augments every image twice. With
`views.augment_on: device` the DataLoader workers only decode images into uint8 tensors
`(C, S, S)` (`ToUint8Tensor`), and `DeviceViews` turns each batch `(B, C, S, S)` into the
views on the training device: the same steps, in the same order and with the same parameter
distributions, as the per-image lightly/torchvision path in `transforms.view_transform`:

    random resized crop (scale from the settings, ratio 3/4..4/3, torchvision's 10 tries and
    centre-crop fallback) -> horizontal flip -> vertical flip -> 90 degree rotation
    -> color jitter with probability p (brightness, contrast, saturation, hue in a random order
    per image, clamped after each step) -> grayscale -> gaussian blur -> solarize
    -> normalize with the data's mean/std.

Every image of every view draws its own parameters (a batched torchvision v2 transform draws
one set per call, which would give all images in a batch the same crop: wrong for SSL).
One-channel images skip saturation, hue and grayscale, as PIL does for mode "L".

How:
- crop, flips and rotation are one affine sampling grid per view and one batched
  `F.grid_sample` (bilinear, pixel centres), the grid clamped to the crop box's outer pixel
  centres so that edges repeat as when resizing the cropped image (matches torchvision's
  resized_crop to 1e-5). The canvas the workers deliver is the view size, so a crop is only
  ever enlarged and needs no antialiasing.
- brightness, contrast and saturation are all `clamp(f * x + (1 - f) * g)` with g = 0, the mean
  gray level, or the gray image; so each of the 4 jitter steps is one `lerp` over the batch
  with per-view f and g, plus the hue rotation on the views whose step it is.
- blur: a per-view separable gaussian as a grouped (depthwise) convolution over the views
  drawn to be blurred, kernel size 2 * ceil(3 * max sigma) + 1, edges replicated like PIL's.
- on CPUs the views are made a few at a time (`CPU_CHUNK_PIXELS`), on GPUs all at once.

Why our own vectorized torch and not kornia.augmentation (`same_on_batch=False`): measured on
this project's 2-core CPU (AMD EPYC, torch 2.14, kornia 0.9; two views of a batch, the same
steps, 2 threads, two runs), ours made 12,700-19,100 views/s at 28 px RGB (batch 256) against
kornia's 7,600-10,400, and 260-315 views/s at 224 px (batch 64) against 135-145; at 28 px gray
(crop and flip only) 44,000-53,000 against 27,000-44,000. Kornia also runs its color-jitter
steps in one order per batch, not per image as torchvision does. It is not a dependency.

Against the per-image path on that CPU (DataLoader to views, no model): 28 px RGB ~10,000
views/s against ~2,700 with 2 workers, 28 px gray ~20,000 against ~4,600; at 224 px the
per-image path with 2 workers is faster (~280 against ~200-240 views/s): PIL's uint8 ops beat
float32 tensors there. On GPUs the device path takes the views off the CPU altogether.

Outside these steps the pipeline is unchanged: the online k-NN monitor and the evaluations use
the deterministic evaluation transform in the workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_pipeline.data.bad_images import bad_image, source_of
from ssl_pipeline.data.image_folder import decode_rgb, encoded_bytes
from ssl_pipeline.data.transforms import ViewSettings

# torchvision's RandomResizedCrop default aspect-ratio range and number of tries
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (PIL's, to 3 digits)
SOLARIZE_THRESHOLD = 128 / 255  # lightly's RandomSolarization: pixels >= 128 of 255 inverted
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision ColorJitter's fn_idx
CPU_CHUNK_PIXELS = 2**20  # values per chunk of views on CPUs: 6 views of 3 x 224 x 224


class ToUint8Tensor:
    """What the workers do for device-side views: image -> uint8 tensor `(C, S, S)`.

    Images that are not already S x S are resized (short side to S, bilinear, antialiased) and
    centre-cropped, so that a batch collates; the random crops are then taken from that square
    on the device. A PIL image that comes undecoded with its file bytes (`data.decode`, see
    data/image_folder.py) is decoded by torchvision.io and resized as a tensor, skipping PIL:
    the same decoded pixels, and after torch's uint8 antialiased resize (AVX2, modelled on
    Pillow-SIMD's) within 1 gray level of Pillow's. Any other PIL image is resized by Pillow.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        data = encoded_bytes(image)
        if data is not None:
            try:
                pixels = decode_rgb(data)
            except RuntimeError as error:  # torchvision.io's error for bad image data
                raise bad_image(source_of(image) or "an image file", error) from error
            return self.from_tensor(pixels)
        s = self.size
        if image.size != (s, s):
            (new_w, new_h), (left, top) = self.resized_box(*image.size)
            image = image.resize((new_w, new_h), Image.BILINEAR)
            image = image.crop((left, top, left + s, top + s))
        array = np.asarray(image)  # (S, S) or (S, S, C), uint8
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array.copy(order="C"))  # (C, S, S), writable

    def from_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 `(C, H, W)` -> `(C, S, S)`, as the PIL path."""
        from torchvision.transforms.v2.functional import InterpolationMode, resize

        s, (h, w) = self.size, x.shape[1:]
        if (w, h) != (s, s):
            (new_w, new_h), (left, top) = self.resized_box(w, h)
            x = resize(x, [new_h, new_w], InterpolationMode.BILINEAR, antialias=True)
            x = x[:, top:top + s, left:left + s]
        return x.contiguous()

    def resized_box(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """`(new_w, new_h), (left, top)`: the short side resized to S, the centred S x S box."""
        s = self.size
        scale = s / min(w, h)
        new = (max(s, round(w * scale)), max(s, round(h * scale)))
        return new, ((new[0] - s) // 2, (new[1] - s) // 2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


@dataclass
class ViewParams:
    """Random parameters of N views, one entry per view, each a tensor `(N,)`.

    Crop boxes are in pixels of the source canvas (as torchvision's `top, left, height,
    width`); jitter factors are torchvision's; `order` `(N, 4)` is each view's jitter order.
    """

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    hflip: torch.Tensor
    vflip: torch.Tensor
    rotate: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def __len__(self) -> int:
        return len(self.top)

    def select(self, index: torch.Tensor) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


class DeviceViews:
    """`num_views` randomly augmented, normalized views of a uint8 batch, on its device.

    >>> from ssl_pipeline.data.transforms import fit_views
    >>> views = DeviceViews(fit_views(16, 3, {}), 16, mean=(0.5,) * 3, std=(0.25,) * 3)
    >>> x0, x1 = views(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8))
    >>> x0.shape, x0.dtype
    (torch.Size([4, 3, 16, 16]), torch.float32)
    """

    def __init__(self, views: ViewSettings, image_size: int, mean, std, num_views: int = 2):
        self.views = views
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_views = num_views
        s = views.color_jitter_strength
        # torchvision ColorJitter's ranges from lightly's SimCLR factors (0.8, 0.8, 0.8, 0.2)
        self.jitter_ranges = (
            (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s),
            (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s),
            (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s),
            (-0.2 * s, 0.2 * s),
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.views}, image_size={self.image_size}, "
                f"num_views={self.num_views})")

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 `(B, C, H, W)` -> `num_views` float tensors `(B, C, S, S)`, normalized."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"DeviceViews wants a uint8 batch (B, C, H, W), got {images.dtype} "
                            f"{tuple(images.shape)}")
        b, c, h, w = images.shape
        n, s = self.num_views * b, self.image_size
        params = self.sample(n, h, w, images.device)  # view v of image i is entry v * B + i
        out = torch.empty(n, c, s, s, device=images.device)
        # On CPUs, a few views at a time: the temporaries then stay in cache (and below
        # malloc's mmap threshold); 224 px views ran 2-3x faster in chunks of 6 than 128 at once.
        chunk = n if images.device.type != "cpu" else max(1, CPU_CHUNK_PIXELS // (c * s * s))
        for start in range(0, n, chunk):
            index = torch.arange(start, min(n, start + chunk), device=images.device)
            x = images[index % b].float().div_(255)  # (chunk, C, H, W)
            out[start:start + len(index)] = self.apply(x, params.select(index))
        return list(out.chunk(self.num_views))

    # ------------------------------------------------------------------ parameters

    def sample(self, n: int, height: int, width: int, device, generator=None) -> ViewParams:
        """Independent parameters for `n` views of `height x width` images."""
        v = self.views

        def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
            u = torch.rand(*(shape or (n,)), device=device, generator=generator)
            return lo + (hi - lo) * u

        def coin(p: float) -> torch.Tensor:
            return torch.rand(n, device=device, generator=generator) < p

        top, left, box_h, box_w = self._crop_boxes(n, height, width, device, uniform)
        jitter_draws = [uniform(lo, hi) for lo, hi in self.jitter_ranges]
        order = torch.rand(n, 4, device=device, generator=generator).argsort(dim=1)
        return ViewParams(
            top=top, left=left, height=box_h, width=box_w,
            hflip=coin(v.hflip_prob), vflip=coin(v.vflip_prob), rotate=coin(v.rotation_prob),
            jitter=coin(v.color_jitter_prob),
            brightness=jitter_draws[0], contrast=jitter_draws[1], saturation=jitter_draws[2],
            hue=jitter_draws[3], order=order,
            grayscale=coin(v.grayscale_prob),
            blur=coin(v.blur_prob), sigma=uniform(*v.blur_sigmas),
            solarize=coin(v.solarize_prob),
        )

    def _crop_boxes(self, n, height, width, device, uniform):
        """torchvision RandomResizedCrop's boxes, vectorized: per view the first of 10 tries
        that fits, else the centre crop; offsets uniform over the positions that fit."""
        v = self.views
        area = height * width
        target = area * uniform(v.crop_min_scale, v.crop_max_scale, n, CROP_TRIES)
        ratio = torch.exp(uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), n, CROP_TRIES))
        w = torch.round(torch.sqrt(target * ratio))
        h = torch.round(torch.sqrt(target / ratio))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.float().argmax(dim=1, keepdim=True)  # index of the first try that fits
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        found = fits.any(dim=1)
        fallback_h, fallback_w = centre_crop_size(height, width)
        w = torch.where(found, w, torch.full_like(w, fallback_w))
        h = torch.where(found, h, torch.full_like(h, fallback_h))
        top = torch.floor(uniform(0, 1) * (height - h + 1)).clamp_max_(height - h)
        left = torch.floor(uniform(0, 1) * (width - w + 1)).clamp_max_(width - w)
        top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
        return top, left, h, w

    # ------------------------------------------------------------------ applying them

    def apply(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """float `(N, C, H, W)` in [0, 1] and N views' parameters -> `(N, C, S, S)` normalized."""
        x = self.geometry(x, p)
        x = self.color_jitter(x, p)
        if x.shape[1] == 3 and bool(p.grayscale.any()):
            gray = grayscale(x).expand_as(x)
            x = torch.where(p.grayscale[:, None, None, None], gray, x)
        x = self.blur(x, p)
        if bool(p.solarize.any()):
            solarize = p.solarize[:, None, None, None] & (x >= SOLARIZE_THRESHOLD)
            x = torch.where(solarize, 1.0 - x, x)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)[None, :, None, None]
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype)[None, :, None, None]
        return x.sub_(mean).div_(std)

    def geometry(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """Crop, resize to S, flips and rotation: one affine grid per view, one grid_sample.

        In grid_sample's coordinates (-1..1, pixel centres, align_corners=False) a crop box is
        `source = centre + half_size * output`; a flip negates an output axis and a 90 degree
        counter-clockwise rotation (PIL's and torchvision's rotate(90)) maps output (u, v) to
        pre-rotation (-v, u). The steps run crop, hflip, vflip, rotate, so the rotation is
        undone first.
        """
        n, c, height, width = x.shape
        s = self.image_size
        sx, sy = p.width / width, p.height / height  # half sizes in normalized units
        cx = (2 * p.left + p.width) / width - 1
        cy = (2 * p.top + p.height) / height - 1
        fx = torch.where(p.hflip, -sx, sx)
        fy = torch.where(p.vflip, -sy, sy)
        zero = torch.zeros_like(fx)
        # without rotation: x_src = cx + fx * u, y_src = cy + fy * v;
        # rotated: (u, v) <- (-v, u), so x_src = cx - fx * v, y_src = cy + fy * u
        r = p.rotate
        theta = torch.stack([
            torch.stack([torch.where(r, zero, fx), torch.where(r, -fx, zero), cx], dim=1),
            torch.stack([torch.where(r, fy, zero), torch.where(r, zero, fy), cy], dim=1),
        ], dim=1).to(x.dtype)  # (N, 2, 3)
        grid = F.affine_grid(theta, [n, c, s, s], align_corners=False)  # (N, S, S, 2): x, y
        # clamp to the box's outer pixel centres: enlarging a crop repeats its edge pixels (as
        # resizing the cropped image does) instead of blending in the pixels next to the box
        lo = torch.stack([(2 * p.left + 1) / width, (2 * p.top + 1) / height], dim=1) - 1
        hi = torch.stack([(2 * (p.left + p.width) - 1) / width,
                          (2 * (p.top + p.height) - 1) / height], dim=1) - 1
        grid = torch.maximum(torch.minimum(grid, hi[:, None, None].to(x.dtype)),
                             lo[:, None, None].to(x.dtype))
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def color_jitter(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """torchvision's ColorJitter per view, in each view's own random order."""
        if not bool(p.jitter.any()):
            return x
        rgb = x.shape[1] == 3
        on = p.jitter
        factors = torch.stack([p.brightness, p.contrast, p.saturation, p.hue], dim=1)  # (N, 4)
        for step in range(4):
            op = p.order[:, step]  # (N,)
            # brightness: g = 0; contrast: g = the mean gray level; saturation: g = the gray
            # image (gray images: saturation and hue do nothing, as for PIL mode "L")
            blend = on & ((op == BRIGHTNESS) | (op == CONTRAST) | ((op == SATURATION) & rgb))
            f = torch.where(blend, factors.gather(1, op[:, None]).squeeze(1), 1.0)
            gray = grayscale(x) if rgb else x
            mean = gray.mean(dim=(1, 2, 3), keepdim=True)
            g = torch.where((op == SATURATION)[:, None, None, None], gray,
                            torch.where((op == CONTRAST)[:, None, None, None], mean, 0.0))
            x = torch.lerp(g, x, f[:, None, None, None]).clamp_(0, 1)  # f * x + (1 - f) * g
            hue = (on & (op == HUE)).nonzero().squeeze(1)
            if rgb and len(hue):
                x[hue] = adjust_hue(x[hue], p.hue[hue])
        return x

    def blur(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """Gaussian blur (PIL's GaussianBlur(radius=sigma)) of the views drawn to be blurred."""
        if not bool(p.blur.any()):
            return x
        idx = p.blur.nonzero().squeeze(1)
        m, c, h, w = len(idx), *x.shape[1:]
        radius = math.ceil(3 * max(self.views.blur_sigmas))
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        sigma = p.sigma[idx].to(x.dtype)[:, None]
        kernel = torch.exp(-0.5 * (offsets[None] / sigma) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (M*C, K)
        y = x[idx].reshape(1, m * c, h, w)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"),
                     kernel[:, None, :, None], groups=m * c)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"),
                     kernel[:, None, None, :], groups=m * c)
        x = x.clone()
        x[idx] = y.reshape(m, c, h, w)
        return x


def centre_crop_size(height: int, width: int) -> tuple[int, int]:
    """torchvision RandomResizedCrop's fallback box size when no try fits."""
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        return int(round(width / CROP_RATIO[0])), width
    if in_ratio > CROP_RATIO[1]:
        return height, int(round(height * CROP_RATIO[1]))
    return height, width


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """`(N, 3, H, W)` -> `(N, 1, H, W)` luma, torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b)[:, None]


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images `(N, 3, H, W)` in [0, 1] by `shift` `(N,)` turns.

    torchvision's HSV round trip, with hue in sixths of a turn and the closed-form HSV -> RGB
    `c = v - (v - min) * clamp(min(k, 4 - k), 0, 1)`, `k = (n + h) mod 6`, n = 5, 3, 1.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]  # (N, 1, H, W) each
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    inverse = torch.where(delta > 0, delta.reciprocal(), 0.0)  # gray pixels: any hue will do
    h = torch.where(maxc == r, (g - b).mul_(inverse),
                    torch.where(maxc == g, (b - r).mul_(inverse).add_(2.0),
                                (r - g).mul_(inverse).add_(4.0)))
    h.add_(6.0 * shift.to(x.dtype)[:, None, None, None])
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype)[None, :, None, None]
    k = (h + n).remainder_(6.0)  # (N, 3, H, W)
    return torch.minimum(k, 4.0 - k).clamp_(0, 1).mul_(delta).neg_().add_(maxc)
