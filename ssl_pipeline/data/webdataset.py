"""WebDataset tar shards, read map-style: each shard is indexed once, then a sample is one seek.

`data.root` is a folder of `*.tar` shards, one shard, or a brace pattern
(`shards/train-{000000..000099}.tar`). The shards follow WebDataset's convention: a sample is a
run of consecutive tar members sharing a key (the member path up to the first dot of its base
name); its image is the `.jpg`, `.jpeg`, `.png` or `.webp` member, its label the integer text
of a `.cls` member (no `.cls` anywhere: unlabeled). Other members are ignored.

Splits: shards named `train-*`, `val-*` and `test-*`; with no such names all shards are train.
What is missing is carved as for image_folder (val always, test only for labeled data). The
classes are the distinct `.cls` values of train, in order; `class_names` are those values.

Each shard is indexed once with the standard library's tarfile (each sample's key, the offset
and size of its image, its label) and the index is cached in `<shard>.index.npz` next to it,
or under `data/cache/shard_index/` when that folder is read-only; the shard's size and mtime
are stored with it, and a changed shard is indexed again. Reading a sample is then one seek and
one read with a file handle of the reading process (reopened in each DataLoader worker), so
the workers read in parallel without the `webdataset` package. Images are decoded as
image_folder's (`data.decode`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ssl_pipeline.atomic import write_atomic
from ssl_pipeline.data.bad_images import BadImage
from ssl_pipeline.data.base import SPLITS, UNLABELED, DataBundle, datasets
from ssl_pipeline.data.image_folder import open_encoded, photo_bundle, resolve_decode
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.names import DATASET_DESCRIPTIONS

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference within a sample
INDEX_VERSION = 1
INDEX_SUFFIX = ".index.npz"
FALLBACK_INDEX_DIR = Path("data/cache/shard_index")  # relative to the working directory, as cifar's
MAX_OPEN_SHARDS = 64  # file handles each process keeps open (least recently used closed first)
END_OF_ARCHIVE = 1024  # two zero blocks close every tar archive


class TarShards(torch.utils.data.Dataset):
    """The samples of some tar shards as `(8-bit RGB PIL image, label)`, read by seeking.

    `index` holds one entry per sample: `shard` (position in `shards`), `offset` and `size` of
    the image member's data, `key`. Pickles without its file handles (spawned workers).
    """

    def __init__(self, shards: list[Path], index: dict[str, np.ndarray], labels: np.ndarray,
                 decode: str = "pil"):
        self.shards = list(shards)
        self.shard = index["shard"]
        self.offset = index["offset"]
        self.size = index["size"]
        self.keys = index["key"]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.decode = decode
        self._handles: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        data = self.read(i)
        try:
            image = open_encoded(data, self.decode == "torchvision",
                                 source=f"{self.shards[self.shard[i]]} sample {self.keys[i]!r}")
        except (UnidentifiedImageError, OSError) as error:  # Pillow's errors for bad image data
            raise BadImage(
                f"{self.shards[self.shard[i]]}: the image of sample {self.keys[i]!r} cannot be "
                f"decoded ({error}); replace the sample or re-create the shard"
            ) from error
        return image, int(self.labels[i])

    def read(self, i: int) -> bytes:
        """The image member's bytes of sample `i`."""
        handle = self._handle(int(self.shard[i]))
        handle.seek(int(self.offset[i]))
        data = handle.read(int(self.size[i]))
        if len(data) != self.size[i]:
            raise SSLPipelineError(
                f"{self.shards[self.shard[i]]} ended inside sample {self.keys[i]!r}: the shard "
                "changed or was cut short after it was indexed; restore it and run again"
            )
        return data

    def _handle(self, shard: int):
        if self._pid != os.getpid():  # a forked worker: the parent's handles share its offsets
            for handle in self._handles.values():
                handle.close()
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.pop(shard, None) or open(self.shards[shard], "rb")
        self._handles[shard] = handle  # most recently used last
        if len(self._handles) > MAX_OPEN_SHARDS:
            self._handles.popitem(last=False)[1].close()
        return handle

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": OrderedDict(), "_pid": None}

    def __del__(self) -> None:
        for handle in getattr(self, "_handles", {}).values():
            handle.close()


# ------------------------------------------------------------------ finding the shards


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: `{a..b}` numeric ranges (zero padding kept), `{x,y}` lists.

    >>> expand_braces("s-{08..10}.tar")
    ['s-08.tar', 's-09.tar', 's-10.tar']
    >>> expand_braces("{train,val}-{0..1}.tar")
    ['train-0.tar', 'train-1.tar', 'val-0.tar', 'val-1.tar']
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        width = len(span.group(1))
        options = [str(n).zfill(width) for n in range(int(span.group(1)), int(span.group(2)) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [path for option in options for path in expand_braces(head + option + tail)]


def find_shards(root: str | None) -> list[Path]:
    """The shard files `data.root` names: a folder's `*.tar`, a brace pattern, or one file."""
    if not root:
        raise SSLPipelineError(
            "webdataset needs data.root: a folder of .tar shards, one shard, or a brace pattern "
            "such as shards/train-{000000..000099}.tar"
        )
    if "{" in root:
        shards = [Path(path) for path in expand_braces(root)]
        missing = [path for path in shards if not path.is_file()]
        if missing:
            raise SSLPipelineError(
                f"{len(missing)} of the {len(shards)} shards data.root={root!r} names do not "
                f"exist, e.g. {missing[0]}; correct the pattern or the range"
            )
        return shards
    path = Path(root)
    if path.is_file():
        return [path]
    shards = sorted(path.glob("*.tar")) if path.is_dir() else []
    if not shards:
        raise SSLPipelineError(
            f"no .tar shards found at data.root={root!r}; point it at a folder of WebDataset "
            "shards (*.tar, uncompressed), one shard, or a pattern such as "
            "shards/train-{000000..000099}.tar"
        )
    return shards


def split_shards(shards: list[Path]) -> dict[str, list[Path]]:
    """Shards by split from their `train-`, `val-`, `test-` name prefixes (none: all train)."""
    named = {name: [p for p in shards if p.name.startswith(f"{name}-")] for name in SPLITS}
    if not any(named.values()):
        return {"train": shards}
    other = [p for p in shards if not any(p in group for group in named.values())]
    if other:
        raise SSLPipelineError(
            f"{other[0]} has no train-/val-/test- name prefix while other shards have one; "
            "rename it or move it out of data.root"
        )
    if not named["train"]:
        raise SSLPipelineError(
            f"val-/test- shards but no train- shards at {shards[0].parent}; add train- shards"
        )
    return {name: group for name, group in named.items() if group}


# ------------------------------------------------------------------ indexing


def index_shard(shard: Path) -> dict[str, np.ndarray]:
    """One pass over the shard's tar headers: each sample's key, image offset and size, label
    (`UNLABELED` without a `.cls`)."""
    keys, offsets, sizes, labels = [], [], [], []

    def finish(key: str | None, members: dict) -> None:
        if key is None:
            return
        image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image is None:
            raise SSLPipelineError(
                f"{shard}: sample {key!r} has no image (members: "
                f"{', '.join(sorted(members))}); each sample needs a .jpg, .jpeg, .png or .webp"
            )
        keys.append(key)
        offsets.append(image.offset_data)
        sizes.append(image.size)
        label = read_label(tar, members["cls"], shard, key) if "cls" in members else UNLABELED
        labels.append(label)

    try:
        with tarfile.open(shard, "r:") as tar:
            key, members = None, {}
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not member.isfile() or not dot:
                    continue
                name = f"{folder}/{stem}" if folder else stem
                if name != key:  # consecutive members sharing a key make one sample
                    finish(key, members)
                    key, members = name, {}
                members[extension.lower()] = member
            finish(key, members)
            end = tar.offset  # where the end-of-archive blocks start
    except (tarfile.TarError, EOFError) as error:
        raise SSLPipelineError(
            f"{shard} is not a readable tar shard ({error}): not an uncompressed tar file, or cut "
            "short; re-create or re-download it, or move it out of data.root"
        ) from error
    if shard.stat().st_size < end + END_OF_ARCHIVE:
        raise SSLPipelineError(
            f"{shard} ends without the end-of-archive blocks a tar file closes with: it was cut "
            "short (an interrupted copy or download?); re-create or re-download it"
        )
    return {
        "key": np.array(keys, dtype=str),
        "offset": np.array(offsets, dtype=np.int64),
        "size": np.array(sizes, dtype=np.int64),
        "label": np.array(labels, dtype=np.int64),
    }


def read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: Path, key: str) -> int:
    text = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
    if not re.fullmatch(r"\d+", text):
        raise SSLPipelineError(
            f"{shard}: sample {key!r} has the label {text[:20]!r} in its .cls member; WebDataset "
            ".cls labels are class numbers (0, 1, 2, ...)"
        )
    return int(text)


def index_paths(shard: Path) -> list[Path]:
    """Where a shard's index may be cached: next to it, else under the package's cache dir."""
    digest = hashlib.sha256(str(shard.resolve()).encode()).hexdigest()[:16]
    return [shard.with_name(shard.name + INDEX_SUFFIX),
            FALLBACK_INDEX_DIR / f"{shard.name}-{digest}{INDEX_SUFFIX}"]


def shard_stamp(shard: Path) -> np.ndarray:
    """What invalidates a cached index: format version, shard size and mtime (ns)."""
    stat = shard.stat()
    return np.array([INDEX_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)


def load_index(shard: Path) -> dict[str, np.ndarray]:
    """The shard's index from its cache when the shard is unchanged, else built and cached."""
    stamp = shard_stamp(shard)
    for path in index_paths(shard):
        try:
            with np.load(path, allow_pickle=False) as cached:
                if np.array_equal(cached["stamp"], stamp):
                    return {name: cached[name] for name in ("key", "offset", "size", "label")}
        except (OSError, KeyError, ValueError):  # absent, unreadable or another format
            continue
    index = index_shard(shard)
    for path in index_paths(shard):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda tmp: save_npz(tmp, stamp=stamp, **index))
            break
        except OSError:  # a read-only folder: try the next place
            continue
    return index


def save_npz(path: str, **arrays: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would append ".npz" to a name
        np.savez(file, **arrays)


def read_shards(shards: list[Path]) -> dict[str, np.ndarray]:
    """The indexes of `shards`, concatenated, with each sample's shard position."""
    parts = [load_index(shard) for shard in shards]
    index = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    index["shard"] = np.repeat(np.arange(len(shards)), [len(p["key"]) for p in parts])
    return index


def label_samples(name: str, shards: list[Path], index: dict, classes: list[int] | None,
                  decode: str) -> TarShards:
    """The split's samples with each `.cls` value replaced by its position in `classes`."""
    raw = index["label"]
    first = shards[0].parent
    if classes is None:
        if (raw != UNLABELED).any():
            raise SSLPipelineError(f"the {name} shards have .cls labels but the train shards "
                                   f"in {first} have none; label all splits or none")
        return TarShards(shards, index, raw, decode)
    if (raw == UNLABELED).any():
        key = index["key"][np.argmax(raw == UNLABELED)]
        raise SSLPipelineError(
            f"{(raw == UNLABELED).sum()} of the {len(raw)} {name} samples have no .cls label "
            f"(e.g. {key!r} in {shards[index['shard'][np.argmax(raw == UNLABELED)]]}); label "
            "every sample or none"
        )
    unknown = sorted(set(raw.tolist()) - set(classes))
    if unknown:
        raise SSLPipelineError(f"the {name} shards have classes the train shards lack: {unknown}")
    return TarShards(shards, index, np.searchsorted(classes, raw), decode)


@datasets.register("webdataset", DATASET_DESCRIPTIONS["webdataset"])
def build_webdataset(cfg) -> DataBundle:
    if getattr(cfg, "on_bad_image", "error") == "skip":
        raise SSLPipelineError(
            "data.on_bad_image=skip works on image folders; with webdataset shards a sample that "
            "cannot be decoded stops the run, naming its shard and key. Set data.on_bad_image="
            "error, and remove bad samples by re-creating their shard"
        )
    groups = split_shards(find_shards(cfg.root))
    decode = resolve_decode(getattr(cfg, "decode", "auto"))
    indexes = {name: read_shards(shards) for name, shards in groups.items()}
    if not len(indexes["train"]["key"]):
        raise SSLPipelineError(f"the train shards of data.root={cfg.root!r} hold no samples")
    raw = indexes["train"]["label"]
    classes = sorted(set(raw.tolist()) - {UNLABELED}) or None
    if classes is not None and len(classes) == 1:
        raise SSLPipelineError(
            f"the train shards of data.root={cfg.root!r} have a single .cls label ({classes[0]}); "
            "labeled data needs two or more classes. For unlabeled data, drop the .cls members"
        )
    sources = {name: label_samples(name, groups[name], indexes[name], classes, decode)
               for name in groups}
    train = sources.pop("train")
    names = None if classes is None else [str(c) for c in classes]
    return photo_bundle("webdataset", cfg, train, sources, names, source=str(cfg.root))
