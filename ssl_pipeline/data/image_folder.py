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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssl_pipeline.data.base import UNLABELED, DataBundle, Split, carve_splits, datasets
from ssl_pipeline.errors import SSLPipelineError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# the photos are most likely closer to ImageNet than to anything else we know statistics for
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


class ImageFiles(torch.utils.data.Dataset):
    """Image files read lazily as 8-bit RGB PIL images, with integer `labels`."""

    def __init__(self, paths: list[Path], labels: np.ndarray):
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[i]) as image:
            return to_rgb(image), int(self.labels[i])


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit gray is scaled in numpy because Pillow's convert clips it at 255."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        gray = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round()
        image = Image.fromarray(gray.astype(np.uint8), mode="L")
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
    folder: Path, paths: list[Path], names: list[str] | None, classes: list[str] | None
) -> ImageFiles:
    """The images with each class name replaced by its index in `classes` (None: unlabeled)."""
    if classes is None:
        return ImageFiles(paths, np.full(len(paths), UNLABELED))
    if names is None:
        raise SSLPipelineError(f"{folder} has no class folders, unlike the train folder")
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise SSLPipelineError(f"{folder} has classes the train folder lacks: {unknown}")
    index = {name: i for i, name in enumerate(classes)}
    return ImageFiles(paths, np.array([index[name] for name in names]))


@datasets.register("image_folder", "a folder of images: class sub-folders, or unlabeled")
def build_image_folder(cfg) -> DataBundle:
    if not cfg.root or not Path(cfg.root).is_dir():
        raise SSLPipelineError(
            f"image_folder needs data.root set to an existing folder of images; got {cfg.root!r}"
        )
    root = Path(cfg.root)
    split_layout = (root / "train").is_dir()
    train_dir = root / "train" if split_layout else root
    paths, names = read_folder(train_dir)
    classes = sorted(set(names)) if names else None  # the train folder decides the classes
    if classes is not None and len(classes) == 1:
        raise SSLPipelineError(
            f"{train_dir} has a single class folder ({classes[0]}); labeled data needs two or "
            "more class folders. For unlabeled data, set data.root to that folder"
        )
    train = label_images(train_dir, paths, names, classes)
    given = {
        name: label_images(root / name, *read_folder(root / name), classes)
        for name in ("val", "test")
        if split_layout and (root / name).is_dir()
    }
    # carve what the folder does not provide; test only when there are labels to test
    needs_test = classes is not None and "test" not in given
    parts = carve_splits(
        train.labels,
        cfg.split_seed,
        0.0 if "val" in given else cfg.val_fraction,
        cfg.test_fraction if needs_test else None,
    )
    splits = {name: Split(train, parts[name]) for name in parts}
    splits.update({name: Split(source) for name, source in given.items()})
    return DataBundle(
        name="image_folder",
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
        num_classes=len(classes) if classes else None,
        class_names=classes,
        channels=3,
        image_size=DEFAULT_IMAGE_SIZE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=str(root),
    )
