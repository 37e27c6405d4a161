"""ILSVRC-2012 (ImageNet-1k) as users have it on disk, and its subsets.

`data.root` holds `train/<wnid>/*.JPEG` and `val/`, the latter either

- in class folders, `val/<wnid>/*.JPEG` (torchvision's `ImageNet` prepares this layout, with
  its `meta.bin`), or
- flat, `val/ILSVRC2012_val_00000001.JPEG ...`, labelled by the devkit's ground truth: the
  `ILSVRC2012_devkit_t12/` folder or `ILSVRC2012_devkit_t12.tar.gz` (its
  `data/ILSVRC2012_validation_ground_truth.txt` lists each image's ILSVRC2012_ID in file order,
  `data/meta.mat` maps those IDs to wnids), or Kaggle's `LOC_val_solution.csv`
  (`ImageId,PredictionString`, the wnid first). Found in `data.root` or up to three folders
  above it (Kaggle's `ILSVRC/Data/CLS-LOC/`), or named by `data.imagenet.val_labels`.

Classes are the train folders' wnids in sorted order (torchvision's and every peer's indices);
each class is named by its wnid, followed by its first English name when `meta.bin`, the
devkit's `meta.mat` or Kaggle's `LOC_synset_mapping.txt` is at hand (`n01440764 tench`; the
wnid keeps names unique: ImageNet has two classes called "crane").

Splits: ImageNet's val set is our `test` split, the one every paper reports on; our `val`
(for choosing probe settings and checkpoints) is carved from train, stratified and seeded
(`data.val_fraction`). `data.imagenet.class_list` keeps only the listed wnids: `imagenet100`
is CMC's ImageNet-100 (also solo-learn's), or give a file with one wnid per line.
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from ssl_pipeline.data.base import DataBundle, datasets
from ssl_pipeline.data.image_folder import (
    DEFAULT_IMAGE_SIZE,
    ImageFiles,
    Screen,
    list_images,
    photo_bundle,
    resolve_decode,
)
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.names import DATASET_DESCRIPTIONS

DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
KAGGLE_LABELS = "LOC_val_solution.csv"
KAGGLE_NAMES = "LOC_synset_mapping.txt"
WNID = re.compile(r"^n\d{8}$")

# The 100 classes of CMC's ImageNet-100 (Tian et al., 2019; listed in HobbitLong/CMC issue 21),
# the subset solo-learn and most SSL papers on ImageNet-100 use.
IMAGENET100 = ["n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831", "n04517823", "n04589890", "n03062245", "n01773797", "n01735189", "n07831146", "n07753275", "n03085013", "n04485082", "n02105505", "n01983481", "n02788148", "n03530642", "n04435653", "n02086910", "n02859443", "n13040303", "n03594734", "n02085620", "n02099849", "n01558993", "n04493381", "n02109047", "n04111531", "n02877765", "n04429376", "n02009229", "n01978455", "n02106550", "n01820546", "n01692333", "n07714571", "n02974003", "n02114855", "n03785016", "n03764736", "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251", "n02701002", "n03379051", "n02259212", "n07715103", "n03947888", "n04026417", "n02326432", "n03637318", "n01980166", "n02113799", "n02086240", "n03903868", "n02483362", "n04127249", "n02089973", "n03017168", "n02093428", "n02804414", "n02396427", "n04418357", "n02172182", "n01729322", "n02113978", "n03787032", "n02089867", "n02119022", "n03777754", "n04238763", "n02231487", "n03032252", "n02138441", "n02104029", "n03837869", "n03494278", "n04136333", "n03794056", "n03492542", "n02018207", "n04067472", "n03930630", "n03584829", "n02123045", "n04229816", "n02100583", "n03642806", "n04336792", "n03259280", "n02116738", "n02108089", "n03424325", "n01855672", "n02090622"]


@datasets.register("imagenet", DATASET_DESCRIPTIONS["imagenet"])
def build_imagenet(cfg) -> DataBundle:
    root = Path(cfg.root) if cfg.root else None
    if root is None or not (root / "train").is_dir() or not (root / "val").is_dir():
        raise SSLPipelineError(
            f"imagenet needs data.root set to the ILSVRC-2012 folder holding train/<wnid>/ and "
            f"val/; got {cfg.root!r}. torchvision's ImageNet(root) prepares this layout from "
            "the official tar files"
        )
    settings = cfg.imagenet
    keep = class_list(settings.class_list)
    decode = resolve_decode(cfg.decode)
    screen = Screen(cfg)

    paths, wnids = _train_images(root / "train", keep)
    paths, wnids = screen(root / "train", paths, wnids)
    classes = sorted(set(wnids))
    index = {wnid: i for i, wnid in enumerate(classes)}
    train = ImageFiles(paths, np.array([index[w] for w in wnids]), decode)

    val_paths, val_wnids = _val_images(root, settings.val_labels, set(classes))
    val_paths, val_wnids = screen(root / "val", val_paths, val_wnids)
    test = ImageFiles(val_paths, np.array([index[w] for w in val_wnids]), decode)

    names = class_names(root, classes)
    return photo_bundle("imagenet", cfg, train, {"test": test}, names, source=str(root),
                        image_size=DEFAULT_IMAGE_SIZE,  # the protocol's, whatever the files
                        skipped=screen.bad)


def class_list(setting: str | None) -> set[str] | None:
    """The wnids to keep: None (all), `imagenet100`, or a file of wnids (one per line, `#`
    comments allowed)."""
    if setting is None:
        return None
    if setting == "imagenet100":
        return set(IMAGENET100)
    path = Path(setting)
    if not path.is_file():
        raise SSLPipelineError(
            f"data.imagenet.class_list={setting!r} is neither 'imagenet100' nor a file of wnids"
        )
    wnids = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    wnids = [w for w in wnids if w]
    bad = [w for w in wnids if not WNID.match(w)]
    if bad or len(wnids) < 2:
        raise SSLPipelineError(
            f"{path}: a class list holds two or more wnids (n########), one per line; "
            f"found {len(wnids)} lines{f', not wnids: {bad[:3]}' if bad else ''}"
        )
    return set(wnids)


def _train_images(train: Path, keep: set[str] | None) -> tuple[list[Path], list[str]]:
    folders = sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if keep is not None:
        missing = sorted(keep - {f.name for f in folders})
        if missing:
            raise SSLPipelineError(
                f"{len(missing)} class(es) of data.imagenet.class_list have no folder in {train}: "
                f"{missing[:5]}; is this the full ILSVRC-2012 train set?"
            )
        folders = [f for f in folders if f.name in keep]
    paths, wnids = [], []
    for folder in folders:
        found = list_images(folder)
        paths += found
        wnids += [folder.name] * len(found)
    if len(set(wnids)) < 2:
        raise SSLPipelineError(
            f"{train} needs two or more class folders (train/<wnid>/*.JPEG) holding images; "
            f"found {len(set(wnids))}"
        )
    return paths, wnids


def _val_images(root: Path, labels: str | None, classes: set[str]) -> tuple[list[Path], list[str]]:
    """Val images and their wnids, from class folders or a flat folder plus ground truth;
    only the images of `classes`."""
    val = root / "val"
    images = list_images(val)
    if not images:
        raise SSLPipelineError(f"{val} holds no images")
    nested = [p for p in images if p.parent != val]
    if nested and len(nested) == len(images):  # class folders
        pairs = [(p, p.relative_to(val).parts[0]) for p in images]
    elif nested:
        raise SSLPipelineError(
            f"{val} mixes images in class folders with images directly inside it; use one layout"
        )
    else:
        truth = val_ground_truth(root, labels)
        unknown = [p.name for p in images if p.name not in truth]
        if unknown:
            raise SSLPipelineError(
                f"{len(unknown)} val image(s) have no label in the ground truth (e.g. "
                f"{unknown[0]}); does data.imagenet.val_labels belong to this val folder?"
            )
        pairs = [(p, truth[p.name]) for p in images]
    return [p for p, w in pairs if w in classes], [w for _, w in pairs if w in classes]


def val_ground_truth(root: Path, setting: str | None) -> dict[str, str]:
    """`{file name: wnid}` of the flat val folder, from the devkit or Kaggle's CSV."""
    candidates = [Path(setting)] if setting else [
        base / name for base in _around(root) for name in (DEVKIT, f"{DEVKIT}.tar.gz", KAGGLE_LABELS)
    ]
    for path in candidates:
        if path.name.endswith(".csv") and path.is_file():
            return _kaggle_labels(path)
        if path.is_dir() and (path / GROUND_TRUTH).is_file():
            return _devkit_labels((path / GROUND_TRUTH).read_text(), (path / META).read_bytes())
        if path.name.endswith((".tar.gz", ".tgz", ".tar")) and path.is_file():
            return _devkit_labels(*_read_devkit_tar(path))
        if path.is_file() and path.suffix == ".txt":  # the ground-truth file itself
            meta = path.parent / "meta.mat"
            if not meta.is_file():
                raise SSLPipelineError(f"{path} needs the devkit's meta.mat beside it")
            return _devkit_labels(path.read_text(), meta.read_bytes())
    where = setting or f"{root} or the three folders above it"
    raise SSLPipelineError(
        f"{root / 'val'} is flat (no class folders), so its labels must come from the devkit: "
        f"put {DEVKIT}/ or {DEVKIT}.tar.gz (from image-net.org) or Kaggle's {KAGGLE_LABELS} in "
        f"{where}, or set data.imagenet.val_labels to one of them"
    )


def _around(root: Path) -> list[Path]:
    """`root` and the three folders above it: where the devkit and Kaggle's files are looked for."""
    return [root, *list(root.resolve().parents)[:3]]


def _read_devkit_tar(path: Path) -> tuple[str, bytes]:
    with tarfile.open(path) as tar:
        members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        try:
            truth = tar.extractfile(members[GROUND_TRUTH]).read().decode()
            meta = tar.extractfile(members[META]).read()
        except KeyError as missing:
            raise SSLPipelineError(f"{path} lacks {missing}; is it the ILSVRC2012 devkit?") from None
    return truth, meta


def _devkit_synsets(meta: bytes) -> list[tuple[int, str, str]]:
    """`(ILSVRC2012_ID, wnid, words)` of the 1000 leaf classes in the devkit's meta.mat."""
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    return [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]))
            for s in synsets if int(s["num_children"]) == 0]


def _devkit_labels(truth: str, meta: bytes) -> dict[str, str]:
    wnid_of = {i: wnid for i, wnid, _ in _devkit_synsets(meta)}
    ids = [int(line) for line in truth.split()]
    return {f"ILSVRC2012_val_{n:08d}.JPEG": wnid_of[i] for n, i in enumerate(ids, start=1)}


def _kaggle_labels(path: Path) -> dict[str, str]:
    with open(path, newline="") as file:
        return {f"{row['ImageId']}.JPEG": row["PredictionString"].split()[0]
                for row in csv.DictReader(file)}


def class_names(root: Path, wnids: list[str]) -> list[str]:
    """Human-readable names for the wnids when a mapping is at hand, else the wnids."""
    found: dict[str, str] = {}
    meta_bin = root / "meta.bin"  # torchvision's: (wnid -> class names, val wnids)
    if meta_bin.is_file():
        try:
            found = {w: ", ".join(n) if isinstance(n, (list, tuple)) else str(n)
                     for w, n in torch.load(meta_bin, weights_only=True)[0].items()}
        except Exception:  # noqa: BLE001  (names are a nicety; a foreign meta.bin is skipped)
            found = {}
    for base in _around(root):
        if found:
            break
        if (base / KAGGLE_NAMES).is_file():
            lines = (base / KAGGLE_NAMES).read_text().splitlines()
            found = dict(line.split(" ", 1) for line in lines if " " in line)
        elif (base / DEVKIT / META).is_file():
            found = {w: words for _, w, words in _devkit_synsets((base / DEVKIT / META).read_bytes())}
        elif (base / f"{DEVKIT}.tar.gz").is_file():
            meta = _read_devkit_tar(base / f"{DEVKIT}.tar.gz")[1]
            found = {w: words for _, w, words in _devkit_synsets(meta)}
    return [f"{w} {found[w].split(',')[0].strip()}" if found.get(w) else w for w in wnids]
