"""Images listed in a CSV file: paths relative to it, labels, optional splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_pipeline.data import build_dataset
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.recipe import DataConfig


def write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        level = np.full((6, 6), (3000 * i) % 65536, np.uint16)  # 16-bit gray, as scanners write
        Image.fromarray(level).save(folder / f"{i}.png")
        names.append(f"{folder.name}/{i}.png")
    return names


def cfg(table: Path, **overrides) -> DataConfig:
    return DataConfig(name="csv", root=str(table), **overrides)


def test_labels_and_splits_come_from_the_columns(tmp_path):
    names = write_images(tmp_path / "scans", 16)
    lines = ["path,label,split"] + [
        f"{n},{'tumour' if i % 2 else 'normal'},{['train', 'train', 'val', 'test'][i % 4]}"
        for i, n in enumerate(names)]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    bundle = build_dataset(cfg(tmp_path / "labels.csv"))
    assert bundle.class_names == ["normal", "tumour"]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 4, 4)
    image, label = bundle.test[0]  # row 3: "tumour", 16-bit level 9000 -> 35, not clipped
    assert label == 1 and image.mode == "RGB" and np.asarray(image)[0, 0, 0] == round(9000 / 257)


def test_without_a_split_column_the_splits_are_carved(tmp_path):
    names = write_images(tmp_path / "imgs", 20)
    lines = ["image,label"] + [f"{n},{'ab'[i % 2]}" for i, n in enumerate(names)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    bundle = build_dataset(cfg(tmp_path / "t.csv", val_fraction=0.25, test_fraction=0.2))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (12, 4, 4)


def test_no_label_column_means_unlabelled(tmp_path):
    names = write_images(tmp_path / "imgs", 8)
    (tmp_path / "t.csv").write_text("path\n" + "\n".join(str(tmp_path / n) for n in names) + "\n")
    bundle = build_dataset(cfg(tmp_path / "t.csv", val_fraction=0.25))
    assert not bundle.labeled and bundle.test is None and len(bundle.train) == 6


@pytest.mark.parametrize("text, message", [
    ("name,label\nx.png,a\n", "no image column"),
    ("path,label\nmissing.png,a\nalso.png,b\n", "do not exist"),
    ("path,label\nimgs/0.png,a| \nimgs/1.png,|\n", "names no class"),
    ("path,label\nimgs/0.png,a\nimgs/1.png,\n", "have no label"),
    ("path,label,split\nimgs/0.png,a,train\nimgs/1.png,b,holdout\n", "holdout"),
    ("path,label\nimgs/0.png,a\nimgs/1.png,a\n", "two or more classes"),
])
def test_bad_tables_are_clear_errors(tmp_path, text, message):
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(SSLPipelineError, match=message):
        build_dataset(cfg(tmp_path / "t.csv"))


def test_labels_joined_by_a_bar_make_a_multi_label_dataset(tmp_path):
    names = write_images(tmp_path / "xrays", 12)
    findings = ["effusion|mass", "no finding", "mass", "effusion"]
    lines = ["path,label,split"] + [
        f"{n},{findings[i % 4]},{(['train'] * 6 + ['val'] * 3 + ['test'] * 3)[i]}"
        for i, n in enumerate(names)]
    (tmp_path / "findings.csv").write_text("\n".join(lines) + "\n")
    bundle = build_dataset(cfg(tmp_path / "findings.csv"))
    assert bundle.multi_label and bundle.num_classes == 3
    assert bundle.class_names == ["effusion", "mass", "no finding"]
    assert bundle.train.labels.shape == (6, 3) and len(bundle.test) == 3
    image, label = bundle.train[0]
    assert label.tolist() == [1, 1, 0] and image.mode == "RGB"
    assert bundle.train[1][1].tolist() == [0, 0, 1]
    assert bundle.val.labels.sum(0).tolist() == [2, 2, 0]
