"""Any folder of image files, labeled by class sub-folders or unlabeled.

Layouts, decided from where the images are:

- labeled: `root/<class>/*.png`, at least two class folders holding images directly and no
  image directly in root (images deeper inside a class folder belong to it, like torchvision's
  ImageFolder);
- split folders: `root/train/` plus optional `root/val/` and `root/test/`, each laid out as
  above (labeled) or holding images anywhere (unlabeled);
- unlabeled: anything else; every image below root, at any depth, labels -1.

Missing splits are carved from train, stratified and seeded by data.split_seed: val always,
test only for labeled data (with no labels there is nothing to test; val still serves the
pretraining loss).

Decoding (`data.decode`). Items are 8-bit RGB PIL images either way. With `pil` each file is
decoded by Pillow when read. With `torchvision` (and `auto`, where torchvision.io can decode)
8-bit RGB JPEG, PNG and WebP files are returned as Pillow opens them: not decoded yet (Pillow
decodes on first pixel access) and carrying their file bytes. A consumer that wants uint8
tensors (`ToUint8Tensor`, the device-view path's worker step) decodes those bytes with
torchvision.io instead and skips PIL; every other consumer (lightly's per-image views, the eval
transform) gets Pillow's pixels as before. torchvision and Pillow both decode with
libjpeg-turbo, libpng and libwebp: the same pixels (tests/test_decode.py). Gray, palette,
RGBA, CMYK and 16-bit files are converted by Pillow (`to_rgb`) when read: an undecoded PIL
image can only be handed on in its file's own mode.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, features

from ssl_pipeline.data.bad_images import (
    READ_ERRORS,
    SOURCE,
    bad_image,
    check_file,
    refuse_empty,
    scan,
    skipped_record,
)
from ssl_pipeline.data.base import (
    UNLABELED,
    DataBundle,
    Split,
    carve_splits,
    datasets,
    item_label,
)
from ssl_pipeline.data.dicom import EXTENSIONS as DICOM_EXTENSIONS
from ssl_pipeline.data.dicom import is_dicom, read_dicom
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.names import DATASET_DESCRIPTIONS

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", *DICOM_EXTENSIONS)
# the photos are most likely closer to ImageNet than to anything else we know statistics for
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224  # ImageNet's: photos at least this large are trained at this size
SIZE_SAMPLE = 64  # training images whose sizes set a folder's default image size
# Pillow formats torchvision.io decodes to the same pixels (both use libjpeg-turbo, libpng, libwebp)
TENSOR_FORMATS = ("JPEG", "PNG", "WEBP")
ENCODED = "ssl_pipeline_encoded"  # attribute of an undecoded PIL image holding its file bytes


class ImageFiles(torch.utils.data.Dataset):
    """Image files read lazily as 8-bit RGB PIL images, with integer `labels`.

    `decode="torchvision"`: the images a tensor consumer can decode itself come undecoded
    (`open_encoded`); "pil": decoded by Pillow on read.
    """

    def __init__(self, paths: list[Path], labels: np.ndarray, decode: str = "pil"):
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path = self.paths[i]
        try:
            if is_dicom(path):  # pydicom: rescaled, windowed to 8 bits (data/dicom.py)
                return to_rgb(read_dicom(path)), item_label(self.labels, i)
            if self.decode == "torchvision":
                return open_encoded(path.read_bytes(), True, source=path), item_label(self.labels, i)
            with Image.open(path) as image:
                return to_rgb(image), item_label(self.labels, i)
        except READ_ERRORS as error:
            raise bad_image(path, error) from error


def open_encoded(data: bytes, tensor_decode: bool, source: object = None) -> Image.Image:
    """The 8-bit RGB PIL image of an image file's bytes.

    With `tensor_decode`, an 8-bit RGB JPEG, PNG or WebP stays undecoded, its bytes attached
    for `encoded_bytes` and `source` (the file's name, for errors raised when it is decoded
    later); anything else is decoded and converted by Pillow now.
    """
    image = Image.open(io.BytesIO(data))  # reads the header only
    if tensor_decode and image.mode == "RGB" and image.format in TENSOR_FORMATS:
        setattr(image, ENCODED, data)
        setattr(image, SOURCE, str(source) if source is not None else None)
        return image
    with image:
        return to_rgb(image)


def encoded_bytes(image: Image.Image) -> bytes | None:
    """The file bytes of an image from `open_encoded` that no one has decoded yet, else None.

    Once Pillow has loaded the pixels they may have been changed in place, and the bytes no
    longer speak for them. Pillow keeps the decoded pixels in `_im` (`im` before Pillow 11 and
    in pillow-simd), None until the first load.
    """
    data = getattr(image, ENCODED, None)
    pixels = vars(image).get("_im", vars(image).get("im"))
    return data if data is not None and pixels is None else None


def decode_rgb(data: bytes) -> torch.Tensor:
    """JPEG, PNG or WebP file bytes -> uint8 `(3, H, W)` with torchvision.io (no EXIF rotation,
    as Pillow's `Image.open`)."""
    from torchvision.io import ImageReadMode, decode_image

    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs for TorchCodec's (torchcodec >= 0.16),
        # a dependency we do not have yet; until then one warning per image is noise
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        return decode_image(buffer, mode=ImageReadMode.RGB)


@functools.cache
def torchvision_decodes() -> bool:
    """Whether this torchvision build can decode images (its image extension loaded)."""
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (10, 20, 30)).save(buffer, "PNG")
    try:
        return decode_rgb(buffer.getvalue())[:, 0, 0].tolist() == [10, 20, 30]
    except (RuntimeError, ImportError, OSError):
        return False


def resolve_decode(setting: str) -> str:
    """`data.decode` -> the decoder tensor consumers use: "torchvision" or "pil"."""
    if setting == "pil":
        return "pil"
    if torchvision_decodes():
        return "torchvision"
    if setting == "torchvision":
        raise SSLPipelineError(
            "data.decode=torchvision, but this torchvision build cannot decode images (its "
            "image extension did not load); set data.decode=auto or pil"
        )
    return "pil"


def decoder_facts(setting: str) -> dict:
    """Which decoder a run used, for the run record.

    pillow-simd, a drop-in Pillow with SIMD resizing, shows as a ".post" version: it speeds up
    the PIL consumers (torch's uint8 antialiased resize, on the tensor path, is modelled on it).
    """
    import torchvision

    return {
        "decode": setting,
        "tensor_consumers": resolve_decode(setting),
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "pillow_simd": ".post" in PIL.__version__,
        "pillow_libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
    }


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit gray is scaled in numpy because Pillow's convert clips it at 255.

    Palette images go through RGBA (their transparency is dropped with the alpha channel).
    Float pixels, and integer ones outside 16 bits, have no fixed range to scale from: a
    ValueError, rather than Pillow's silent clipping.
    """
    if image.mode == "F":
        raise ValueError("floating-point pixels (mode F): no fixed range to scale to 8 bits; "
                         "save the image as 8- or 16-bit")
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        values = np.asarray(image, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError("32-bit integer pixels outside the 16-bit range: no fixed range to "
                             "scale to 8 bits; save the image as 8- or 16-bit")
        image = Image.fromarray((values / 257.0).round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def list_images(folder: Path) -> list[Path]:
    """Image files below `folder` at any depth, sorted, skipping hidden files and folders."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )


def read_folder(folder: Path) -> tuple[list[Path], list[str] | None]:
    """The images below `folder` and, when it is laid out by class, each image's class."""
    paths = list_images(folder)
    if not paths:
        raise SSLPipelineError(
            f"no images ({', '.join(e[1:] for e in EXTENSIONS)}) found under {folder}; "
            "check data.root"
        )
    parts = [path.relative_to(folder).parts for path in paths]
    in_root = any(len(p) == 1 for p in parts)
    holding_images = {p[0] for p in parts if len(p) == 2}  # folders with images directly inside
    if in_root or not holding_images:
        return paths, None
    if len(holding_images) == 1 and any(p[0] not in holding_images for p in parts):
        return paths, None  # one folder of images beside nested ones: no class structure
    return paths, [p[0] for p in parts]


def label_images(
    folder: Path, paths: list[Path], names: list[str] | None, classes: list[str] | None,
    decode: str = "pil",
) -> ImageFiles:
    """The images with each class name replaced by its index in `classes` (None: unlabeled)."""
    if classes is None:
        return ImageFiles(paths, np.full(len(paths), UNLABELED), decode)
    if names is None:
        raise SSLPipelineError(f"{folder} has no class folders, unlike the train folder")
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise SSLPipelineError(f"{folder} has classes the train folder lacks: {unknown}")
    index = {name: i for i, name in enumerate(classes)}
    return ImageFiles(paths, np.array([index[name] for name in names]), decode)


@datasets.register("image_folder", DATASET_DESCRIPTIONS["image_folder"])
def build_image_folder(cfg) -> DataBundle:
    if not cfg.root or not Path(cfg.root).is_dir():
        raise SSLPipelineError(
            f"image_folder needs data.root set to an existing folder of images; got {cfg.root!r}"
        )
    root = Path(cfg.root)
    decode = resolve_decode(getattr(cfg, "decode", "auto"))  # stand-in configs may lack it
    split_layout = (root / "train").is_dir()
    train_dir = root / "train" if split_layout else root
    screen = Screen(cfg)
    paths, names = screen(train_dir, *read_folder(train_dir))
    classes = sorted(set(names)) if names else None  # the train folder decides the classes
    if classes is not None and len(classes) == 1:
        raise SSLPipelineError(
            f"{train_dir} has a single class folder ({classes[0]}); labeled data needs two or "
            "more class folders. For unlabeled data, set data.root to that folder"
        )
    train = label_images(train_dir, paths, names, classes, decode)
    given = {
        name: label_images(root / name, *screen(root / name, *read_folder(root / name)),
                           classes, decode)
        for name in ("val", "test")
        if split_layout and (root / name).is_dir()
    }
    return photo_bundle("image_folder", cfg, train, given, classes, source=str(root),
                        skipped=screen.bad)


class Screen:
    """Applies `data.on_bad_image` to the files of one folder: `error` refuses empty files
    now (the rest fail when read); `skip` leaves out every file that does not decode,
    remembering why in `bad`."""

    def __init__(self, cfg, check=check_file):
        self.mode = getattr(cfg, "on_bad_image", "error")  # stand-in configs may lack it
        self.workers = getattr(cfg, "num_workers", 0)
        self.check = check  # path -> None, or why the file cannot be used
        self.bad: dict[str, str] = {}

    def __call__(self, folder: Path, paths: list[Path], names: list[str] | None):
        if self.mode == "error":
            refuse_empty(paths)
            return paths, names
        bad = scan(paths, self.workers, check=self.check)
        self.bad.update(bad)
        keep = [i for i, path in enumerate(paths) if str(path) not in bad]
        if not keep:
            raise SSLPipelineError(
                f"none of the {len(paths)} images under {folder} can be read (e.g. "
                f"{paths[0]}: {bad[str(paths[0])]}); check data.root"
            )
        return [paths[i] for i in keep], None if names is None else [names[i] for i in keep]


def photo_bundle(name: str, cfg, train, given: dict, classes: list[str] | None,
                 source: str, skipped: dict[str, str] | None = None,
                 image_size: int | None = None) -> DataBundle:
    """A bundle of RGB photos from a `train` source and the `given` val/test sources;
    `skipped`: the unreadable files `data.on_bad_image=skip` left out (`Screen.bad`).

    Carves what is not given: val always, test only when there are labels to test.
    `image_size`: the size the pipeline resizes to; by default the images' own
    (`native_image_size` of the training split) up to 224.
    """
    needs_test = classes is not None and "test" not in given
    parts = carve_splits(
        train.labels,
        cfg.split_seed,
        0.0 if "val" in given else cfg.val_fraction,
        cfg.test_fraction if needs_test else None,
    )
    splits = {part: Split(train, parts[part]) for part in parts}
    splits.update({part: Split(source_) for part, source_ in given.items()})
    from_files = image_size is None and getattr(cfg, "image_size", None) is None  # else given
    if from_files:
        native = native_image_size(train, parts["train"], cfg.split_seed)
        image_size = min(native or DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    return DataBundle(
        name=name,
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
        num_classes=len(classes) if classes else None,
        class_names=classes,
        channels=3,
        image_size=image_size or DEFAULT_IMAGE_SIZE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=source,
        skipped_images=skipped_record(skipped) if skipped else None,
        image_size_from_files=from_files,
    )


def native_image_size(source, indices, seed: int, sample: int = SIZE_SAMPLE) -> int | None:
    """The median shorter side of up to `sample` of `source`'s images at `indices` (chosen at
    random, seeded), read from the image headers of its files (`source.paths`) or of its
    stored bytes (`source.read(i)`: tar shards); None when none can be read. A folder of 64 px
    satellite chips is then trained at 64 px, not upsampled to 224 at 12x the compute."""
    if len(indices) == 0:
        return None
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.asarray(indices), size=min(sample, len(indices)), replace=False)
    sides = [side for side in (shorter_side(source, int(i)) for i in sorted(chosen)) if side]
    return int(np.median(sides)) if sides else None


def shorter_side(source, i: int) -> int | None:
    """The shorter side of `source`'s image `i` from its header (DICOM: Rows and Columns), or
    None (unreadable, or a source with neither files nor stored bytes)."""
    try:
        paths = getattr(source, "paths", None)
        if paths is not None and is_dicom(paths[i]):
            import pydicom  # optional: the dicom extra

            header = pydicom.dcmread(paths[i], stop_before_pixels=True)
            return min(int(header.Rows), int(header.Columns))
        if paths is not None:
            opened = Image.open(paths[i])
        elif hasattr(source, "read"):
            opened = Image.open(io.BytesIO(source.read(i)))
        else:
            return None
        with opened as image:
            return min(image.size)
    except Exception:  # noqa: BLE001  unreadable, or pydicom missing: the image has no say
        return None
