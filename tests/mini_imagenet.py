"""A miniature ILSVRC-2012 folder: a few classes of small JPEGs, in the layouts users have.

`val_layout`:
- "folders": val/<wnid>/*.JPEG (torchvision's prepared layout, with a meta.bin of names);
- "devkit": flat val/ILSVRC2012_val_%08d.JPEG plus ILSVRC2012_devkit_t12/ (ground truth and
  meta.mat, whose ILSVRC2012_IDs are deliberately not in wnid order, as in the real devkit);
- "devkit_tar": the same devkit as ILSVRC2012_devkit_t12.tar.gz;
- "kaggle": flat val/ with LOC_val_solution.csv and LOC_synset_mapping.txt one folder up
  (Kaggle's ILSVRC/Data/CLS-LOC layout).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
NAMES = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark", "n01491361": "tiger shark, Galeocerdo cuvieri"}


def jpeg(path: Path, label: int, seed: int, size: int = 40) -> None:
    """A class-coloured noisy image: classes are separable, images are not identical."""
    rng = np.random.default_rng(seed)
    base = np.array([(60 * label) % 256, (255 - 50 * label) % 256, (35 * label + 90) % 256])
    pixels = np.clip(base + rng.normal(0, 40, (size, size + 8, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)


def write_meta_mat(path: Path, wnids: list[str], ids: dict[str, int]) -> None:
    from scipy.io import savemat

    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros(len(wnids) + 1, dtype=fields)
    for i, wnid in enumerate(wnids):
        synsets[i] = (ids[wnid], wnid, NAMES.get(wnid, wnid), 0)
    synsets[-1] = (len(wnids) + 1, "n00001740", "entity", 3)  # an inner node: not a class
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"synsets": synsets})


def make_mini_imagenet(root: Path, val_layout: str = "folders", train_per_class: int = 12,
                       val_per_class: int = 4, wnids: list[str] = WNIDS) -> Path:
    """Writes the folder under `root` and returns the directory to give as data.root."""
    data_root = root / "ILSVRC" / "Data" / "CLS-LOC" if val_layout == "kaggle" else root
    for label, wnid in enumerate(wnids):
        for i in range(train_per_class):
            jpeg(data_root / "train" / wnid / f"{wnid}_{i}.JPEG", label, seed=1000 * label + i)
    val = [(wnid, label) for label, wnid in enumerate(wnids) for _ in range(val_per_class)]
    order = np.random.default_rng(0).permutation(len(val))  # val files are not sorted by class
    ids = {wnid: len(wnids) - i for i, wnid in enumerate(wnids)}  # not in wnid order
    truth, kaggle = [], ["ImageId,PredictionString"]
    for n, k in enumerate(order, start=1):
        wnid, label = val[k]
        name = f"ILSVRC2012_val_{n:08d}"
        if val_layout == "folders":
            jpeg(data_root / "val" / wnid / f"{name}.JPEG", label, seed=50_000 + n)
        else:
            jpeg(data_root / "val" / f"{name}.JPEG", label, seed=50_000 + n)
        truth.append(str(ids[wnid]))
        kaggle.append(f"{name},{wnid} 1 2 30 40 {wnid} 3 4 20 30")
    if val_layout == "folders":
        torch.save(({w: tuple(NAMES.get(w, w).split(", ")) for w in wnids}, []), data_root / "meta.bin")
    elif val_layout in ("devkit", "devkit_tar"):
        devkit = root / "ILSVRC2012_devkit_t12"
        (devkit / "data").mkdir(parents=True, exist_ok=True)
        (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(truth) + "\n")
        write_meta_mat(devkit / "data" / "meta.mat", wnids, ids)
        if val_layout == "devkit_tar":
            with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
                tar.add(devkit, arcname="ILSVRC2012_devkit_t12")
            for path in sorted(devkit.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            devkit.rmdir()
    elif val_layout == "kaggle":
        (root / "LOC_val_solution.csv").write_text("\n".join(kaggle) + "\n")
        (root / "LOC_synset_mapping.txt").write_text(
            "\n".join(f"{w} {NAMES.get(w, w)}" for w in wnids) + "\n")
        data_root = root / "ILSVRC" / "Data" / "CLS-LOC"
    else:
        raise ValueError(val_layout)
    return data_root
