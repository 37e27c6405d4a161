"""The torchvision.io decode path (`data.decode`) against the PIL path it replaces.

Tolerances: PNG is lossless, so both decoders must give identical pixels. JPEG decoding is
only specified to within rounding (the IDCT and chroma upsampling may differ between decoder
builds), so 1 gray level is allowed; torchvision and Pillow both ship libjpeg-turbo with the
same defaults (integer IDCT, fancy upsampling) and agree exactly here. Resizing: torch's
antialiased uint8 bilinear resize (AVX2, modelled on Pillow-SIMD's) has its own fixed-point
rounding: within 1 gray level of Pillow's, on under 1% of the pixels when shrinking.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from ssl_pipeline.data import build_dataset, image_folder
from ssl_pipeline.data.device_views import ToUint8Tensor
from ssl_pipeline.data.image_folder import ImageFiles, encoded_bytes, open_encoded, resolve_decode
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.recipe import DataConfig, recipe_from_dict

JPEG_LEVELS = 1  # decoder rounding, see above
RESIZE_LEVELS = 1


def photo(width: int, height: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: content with edges and texture, as photos have."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    planes = [(x * (3 + c) + y * (5 - c)) % 256 for c in range(channels)]
    image = np.stack(planes, axis=-1) + rng.normal(0, 20, (height, width, channels))
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image[..., 0] if channels == 1 else image


def write(path: Path, pixels: np.ndarray, **options) -> Path:
    Image.fromarray(pixels).save(path, **options)
    return path


CASES = {  # name -> (file name, pixel planes, whether torchvision decodes it, lossy)
    "jpeg_rgb": ("a.jpg", 3, True, True),
    "png_rgb": ("a.png", 3, True, False),
    "webp_rgb": ("a.webp", 3, True, True),  # Pillow writes lossy WebP by default
    # not RGB in the file: Pillow converts when read (an undecoded PIL image keeps its mode)
    "jpeg_gray": ("a.jpg", 1, False, True),
    "png_gray": ("a.png", 1, False, False),
    "png_16bit": ("a.png", 16, False, False),
}


def write_case(folder: Path, case: str, width: int, height: int) -> Path:
    name, planes, _, _ = CASES[case]
    if planes == 16:  # 16-bit gray, the full range used
        pixels = photo(width, height, 1).astype(np.uint16) * 257 + 100
    else:
        pixels = photo(width, height, planes)
    return write(folder / name, pixels)


def both_paths(path: Path, size: int):
    """`ToUint8Tensor(size)` of the file read with decode=pil and with decode=torchvision."""
    pil, tv = (ImageFiles([path], np.zeros(1), decode)[0][0] for decode in ("pil", "torchvision"))
    return ToUint8Tensor(size)(pil).numpy(), ToUint8Tensor(size)(tv).numpy(), tv


@pytest.mark.parametrize("case", CASES)
def test_decoders_give_the_same_pixels(tmp_path, case):
    _, _, tensor_path, lossy = CASES[case]
    path = write_case(tmp_path, case, 32, 32)
    pil, tv, item = both_paths(path, 32)  # the image's own size: no resize, decoders alone
    assert (encoded_bytes(item) is not None) == tensor_path
    assert pil.shape == tv.shape == (3, 32, 32) and tv.dtype == np.uint8
    tolerance = JPEG_LEVELS if tensor_path and lossy else 0
    assert np.abs(pil.astype(int) - tv).max() <= tolerance


@pytest.mark.parametrize("case", CASES)
def test_resized_pixels_match_pil_within_a_level(tmp_path, case):
    _, _, tensor_path, _ = CASES[case]
    path = write_case(tmp_path, case, 37, 29)
    for size in (16, 29, 40):  # down, short side already there, up
        pil, tv, _ = both_paths(path, size)
        assert pil.shape == tv.shape == (3, size, size)
        diff = np.abs(pil.astype(int) - tv)
        assert diff.max() <= RESIZE_LEVELS and (diff > 0).mean() < 0.05, (size, diff.max())
        if not tensor_path:  # Pillow decoded and resized both: identical
            assert diff.max() == 0


def test_sixteen_bit_png_is_scaled_as_to_rgb_does(tmp_path):
    path = write(tmp_path / "a.png", np.full((8, 8), 32896, np.uint16))  # 32896 / 257 = 128
    image = ImageFiles([path], np.zeros(1), "torchvision")[0][0]
    assert encoded_bytes(image) is None  # torchvision would keep 16 bits: Pillow's to_rgb
    assert ToUint8Tensor(8)(image).unique().tolist() == [128]


def test_pil_consumers_get_the_same_pixels_from_an_undecoded_image(tmp_path):
    path = write(tmp_path / "a.jpg", photo(20, 24, 3))
    eager = ImageFiles([path], np.zeros(1), "pil")[0][0]
    lazy = ImageFiles([path], np.zeros(1), "torchvision")[0][0]
    assert lazy.mode == "RGB" and lazy.size == eager.size == (20, 24)
    assert encoded_bytes(lazy) is not None
    assert np.array_equal(np.asarray(lazy), np.asarray(eager))  # Pillow decodes on first access
    assert encoded_bytes(lazy) is None  # decoded now: the bytes no longer speak for the pixels


def test_decode_pil_never_attaches_bytes(tmp_path):
    data = write(tmp_path / "a.png", photo(8, 8, 3)).read_bytes()
    assert encoded_bytes(open_encoded(data, tensor_decode=False)) is None
    assert encoded_bytes(open_encoded(data, tensor_decode=True)) == data


def test_the_recipe_chooses_the_decoder_and_auto_falls_back(tmp_path, monkeypatch):
    for i in range(8):
        write(tmp_path / f"{i}.jpg", photo(20, 20, 3, seed=i))
    first = {d: build_dataset(DataConfig(name="image_folder", root=str(tmp_path), decode=d))
             .train[0][0] for d in ("auto", "pil", "torchvision")}
    assert [encoded_bytes(first[d]) is not None for d in ("auto", "pil", "torchvision")] == [
        True, False, True]
    monkeypatch.setattr(image_folder, "torchvision_decodes", lambda: False)
    assert resolve_decode("auto") == "pil"
    with pytest.raises(SSLPipelineError, match="data.decode=auto or pil"):
        resolve_decode("torchvision")
    with pytest.raises(SSLPipelineError, match="data.decode"):
        recipe_from_dict({"data": {"decode": "simd"}})


def test_the_decoder_facts_name_pillow_simd(monkeypatch):
    facts = image_folder.decoder_facts("pil")
    assert facts["tensor_consumers"] == "pil" and facts["pillow"] == PIL.__version__
    monkeypatch.setattr(PIL, "__version__", "9.5.0.post1")  # how pillow-simd versions read
    assert image_folder.decoder_facts("auto")["pillow_simd"] is True


def test_image_files_keep_their_decoder_through_pickling(tmp_path):
    # a spawned DataLoader worker receives the dataset pickled
    path = write(tmp_path / "a.jpg", photo(20, 20, 3))
    files = pickle.loads(pickle.dumps(ImageFiles([path], np.zeros(1), "torchvision")))
    assert encoded_bytes(files[0][0]) == path.read_bytes()
