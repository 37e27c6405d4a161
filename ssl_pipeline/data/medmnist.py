"""MedMNIST v2: twelve standardized 2-D medical image datasets, read from MedMNIST's own files.

`data.medmnist.subset` names the dataset (`pathmnist`, `dermamnist`, ...) and
`data.medmnist.size` its resolution (28, 64, 128 or 224). The file is `{subset}.npz` at 28 px
and `{subset}_{size}.npz` otherwise, with `train_images`, `train_labels`, `val_images`,
`val_labels`, `test_images`, `test_labels`: uint8 images `(N, H, W)` (gray) or `(N, H, W, 3)`
(RGB), integer labels `(N, 1)`; ChestMNIST's are `(N, 14)` 0/1, one per finding (multi-label).
MedMNIST's own train / val / test splits are used as they are.

The file is looked for in `data.root`, else `data/cache/medmnist/`, else `~/.medmnist/` (the
`medmnist` package's default). With `data.download: true` the `medmnist` package fetches it
(it needs internet); otherwise a missing file is an error saying which file to put where.

ChestMNIST is multi-label: the evaluation stages then score each finding (binary cross-entropy
per label in the probe and fine-tuning, similarity-weighted label votes in k-NN) and report
MedMNIST's multi-label AUC and ACC (evals/metrics.py `multi_label_metrics`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_pipeline.data.base import (
    ArrayDataset,
    DataBundle,
    Split,
    datasets,
    pixel_stats,
)
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.names import DATASET_DESCRIPTIONS

# subset -> number of classes (MedMNIST v2, Yang et al. 2023, Table 1)
SUBSETS = {
    "pathmnist": 9, "chestmnist": 14, "dermamnist": 7, "octmnist": 4, "pneumoniamnist": 2,
    "retinamnist": 5, "breastmnist": 2, "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11,
    "organcmnist": 11, "organsmnist": 11,
}
MULTI_LABEL = {"chestmnist"}
# ChestMNIST's 14 findings (NIH ChestX-ray14), in its label order
CHEST_FINDINGS = ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                  "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                  "pleural", "hernia")
SIZES = (28, 64, 128, 224)
DEFAULT_DIRS = (Path("data/cache/medmnist"), Path.home() / ".medmnist")
KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")


def file_name(subset: str, size: int) -> str:
    return f"{subset}.npz" if size == 28 else f"{subset}_{size}.npz"


@datasets.register("medmnist", DATASET_DESCRIPTIONS["medmnist"])
def build_medmnist(cfg) -> DataBundle:
    subset, size = cfg.medmnist.subset, cfg.medmnist.size
    multi = subset in MULTI_LABEL
    path = find_file(cfg.root, subset, size, download=cfg.download)
    arrays = read_npz(path, subset)
    images = {split: arrays[f"{split}_images"] for split in ("train", "val", "test")}
    labels = {split: arrays[f"{split}_labels"].astype(np.int64) if multi
              else arrays[f"{split}_labels"].reshape(-1).astype(np.int64)
              for split in ("train", "val", "test")}
    num_classes = SUBSETS[subset]
    for split, y in labels.items():
        if multi and not np.isin(y, (0, 1)).all():
            raise SSLPipelineError(f"{path}: {split}_labels of {subset} must be 0 or 1 per finding")
        if not multi and len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise SSLPipelineError(
                f"{path}: {split}_labels lie in [{y.min()}, {y.max()}], but {subset} has "
                f"{num_classes} classes; is the file {subset}'s?"
            )
    channels = 1 if images["train"].ndim == 3 else images["train"].shape[3]
    mean, std = pixel_stats(images["train"])
    sources = {split: ArrayDataset(images[split], labels[split]) for split in images}
    return DataBundle(
        name="medmnist",
        train=Split(sources["train"]),
        val=Split(sources["val"]),
        test=Split(sources["test"]),
        num_classes=num_classes,
        class_names=class_names(subset),
        channels=channels,
        image_size=int(images["train"].shape[1]),
        mean=mean,
        std=std,
        source=str(path),
        multi_label=multi,
    )


def find_file(root: str | None, subset: str, size: int, download: bool = False) -> Path:
    name = file_name(subset, size)
    folders = [Path(root)] if root else list(DEFAULT_DIRS)
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    target = folders[0]
    if download:
        return fetch(subset, size, target)
    raise SSLPipelineError(
        f"MedMNIST file {name} not found in {' or '.join(map(str, folders))}. Put MedMNIST's "
        f"{name} (from its Zenodo record, see medmnist.com) in {target}, or set "
        "data.download=true to fetch it with the medmnist package (pip install medmnist; needs "
        "internet), or point data.root at the folder holding it"
    )


def fetch(subset: str, size: int, folder: Path) -> Path:
    """Download with the `medmnist` package, which knows the files' URLs and checksums."""
    try:
        import medmnist
    except ImportError:
        raise SSLPipelineError(
            "data.download=true for MedMNIST needs the medmnist package: pip install medmnist"
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    info = medmnist.INFO[subset]
    dataset_class = getattr(medmnist, info["python_class"])
    try:
        dataset_class(split="test", download=True, root=str(folder), size=size)
    except Exception as error:
        raise SSLPipelineError(
            f"downloading {file_name(subset, size)} failed ({type(error).__name__}: {error}); "
            f"put the file in {folder} by hand"
        ) from error
    return folder / file_name(subset, size)


def read_npz(path: Path, subset: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in KEYS if key not in data.files]
            if missing:
                raise SSLPipelineError(
                    f"{path} lacks {missing}; MedMNIST files hold {', '.join(KEYS)}")
            arrays = {key: data[key] for key in KEYS}
    except (OSError, ValueError) as error:
        raise SSLPipelineError(f"{path} is not a readable .npz file ({error})") from error
    for split in ("train", "val", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] != 3):
            raise SSLPipelineError(
                f"{path}: {split}_images is {x.dtype} {x.shape}; MedMNIST images are uint8 "
                "(N, H, W) or (N, H, W, 3)")
        width = SUBSETS[subset] if subset in MULTI_LABEL else 1
        if len(y) != len(x) or y.ndim != 2 or y.shape[1] != width:
            raise SSLPipelineError(
                f"{path}: {split}_labels is {y.shape} for {len(x)} images; {subset} labels are "
                f"(N, {width})")
    return arrays


def class_names(subset: str) -> list[str]:
    """MedMNIST's label names when the medmnist package is installed, else `class 0`, ..."""
    try:
        import medmnist

        names = medmnist.INFO[subset]["label"]
        return [names[str(i)] for i in range(SUBSETS[subset])]
    except (ImportError, KeyError):
        if subset == "chestmnist":
            return list(CHEST_FINDINGS)
        return [f"class {i}" for i in range(SUBSETS[subset])]
