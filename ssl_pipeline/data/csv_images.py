"""Labelled (or unlabelled) image files listed in a CSV file: `data.name: csv`, `data.root:
path/to/labels.csv`.

The CSV has a header row. The image column is `path` (also accepted: `image`, `file`,
`filename`), relative to the CSV's folder unless absolute; the optional `label` column holds
class names (any text; classes are sorted); an optional `split` column (`train`, `val`,
`test`) fixes the splits, otherwise they are carved from the rows as for image_folder. Rows
without a label make the dataset unlabelled (all or none must have one). Images are read as
image_folder's: gray, palette, CMYK, RGBA and 16-bit files converted, unreadable ones handled
by `data.on_bad_image`.

Multi-label: labels joined by `|` (`effusion|mass`, as NIH ChestX-ray14's CSV writes them) make
the dataset multi-label when any row has two or more: every name is a label, each image a 0/1
vector over them, and the evaluation stages score each label (MedMNIST's multi-label AUC and
ACC). Every row still needs a label: name the negative case (e.g. `no finding`).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from ssl_pipeline.data.base import UNLABELED, DataBundle, datasets
from ssl_pipeline.data.image_folder import (
    ImageFiles,
    Screen,
    photo_bundle,
    resolve_decode,
)
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.names import DATASET_DESCRIPTIONS

PATH_COLUMNS = ("path", "image", "file", "filename")
SEPARATOR = "|"  # between the labels of a multi-label row
SPLITS = ("train", "val", "test")


@datasets.register("csv", DATASET_DESCRIPTIONS["csv"])
def build_csv(cfg) -> DataBundle:
    table = Path(cfg.root) if cfg.root else None
    if table is None or not table.is_file():
        raise SSLPipelineError(
            f"csv needs data.root set to a CSV file with a header row (path,label[,split]); "
            f"got {cfg.root!r}"
        )
    rows = read_rows(table)
    labeled = _labeled(rows, table)
    multi = labeled and any(SEPARATOR in row["label"] for row in rows)
    classes = sorted({name for row in rows for name in label_names(row["label"])}) \
        if labeled else None
    if classes is not None and len(classes) < 2:
        raise SSLPipelineError(f"{table}: labelled data needs two or more classes, found {classes}")
    index = {name: i for i, name in enumerate(classes or [])}
    decode = resolve_decode(cfg.decode)
    screen = Screen(cfg)
    groups = {}
    for split in SPLITS:
        chosen = [row for row in rows if row.get("split", "train") == split]
        if not chosen:
            continue
        paths = [row["file"] for row in chosen]
        names = [row["label"] for row in chosen] if labeled else None
        paths, names = screen(table, paths, names)
        if not labeled:
            labels = np.full(len(paths), UNLABELED)
        elif multi:  # (N, L) of 0/1
            labels = np.zeros((len(paths), len(classes)), np.int64)
            for i, text in enumerate(names):
                labels[i, [index[n] for n in label_names(text)]] = 1
        else:
            labels = np.array([index[n] for n in names])
        groups[split] = ImageFiles(paths, labels, decode)
    if "train" not in groups:
        raise SSLPipelineError(f"{table}: no rows of the train split")
    train = groups.pop("train")
    bundle = photo_bundle("csv", cfg, train, groups, classes, source=str(table),
                          skipped=screen.bad)
    return dataclasses.replace(bundle, multi_label=multi)


def label_names(text: str) -> list[str]:
    """`"effusion|mass"` -> `["effusion", "mass"]` (one name: a single-label row).

    >>> label_names("effusion | mass|effusion")
    ['effusion', 'mass']
    """
    return sorted({name.strip() for name in text.split(SEPARATOR) if name.strip()})


def read_rows(table: Path) -> list[dict[str, str]]:
    """The CSV's rows with `file` (a Path), `label` and `split` where given; checked."""
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        column = next((c for c in PATH_COLUMNS if c in columns), None)
        if column is None:
            raise SSLPipelineError(
                f"{table}: no image column; the header needs one of {', '.join(PATH_COLUMNS)} "
                f"(found {columns or 'no header'})"
            )
        raw = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not raw:
        raise SSLPipelineError(f"{table} lists no images")
    rows = []
    for line, row in enumerate(raw, start=2):
        file = Path(row[column])
        row["file"] = file if file.is_absolute() else table.parent / file
        split = row.get("split")
        if "split" in row and split not in SPLITS:
            raise SSLPipelineError(f"{table}, line {line}: split {split!r} is not one of {SPLITS}")
        if "label" in row and row["label"] and not label_names(row["label"]):
            raise SSLPipelineError(f"{table}, line {line}: label {row['label']!r} names no class")
        rows.append(row)
    missing = [str(r["file"]) for r in rows if not r["file"].is_file()]
    if missing:
        raise SSLPipelineError(
            f"{table}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}; paths are "
            "relative to the CSV's folder unless absolute"
        )
    return rows


def _labeled(rows: list[dict[str, str]], table: Path) -> bool:
    with_label = sum(bool(row.get("label")) for row in rows)
    if with_label not in (0, len(rows)):
        raise SSLPipelineError(
            f"{table}: {len(rows) - with_label} of {len(rows)} rows have no label; label all "
            "rows, or none for unlabelled data"
        )
    return with_label > 0
