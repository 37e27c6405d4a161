"""WebDataset tar shards: the same samples as the same files in a folder, the index cache,
reading from DataLoader workers, the error messages, and a tiny run end to end."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
from PIL import Image

import ssl_pipeline
from ssl_pipeline.data import UNLABELED, build_dataset
from ssl_pipeline.data import webdataset as wds
from ssl_pipeline.data.device_views import ToUint8Tensor
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.recipe import DataConfig

ROOT = Path(__file__).parents[1]


def write_images(folder: Path, counts: dict[str, int], size: int = 20) -> list[Path]:
    """Class folders of small JPEGs and PNGs with distinct content; the paths, sorted."""
    rng = np.random.default_rng(0)
    for c, (name, count) in enumerate(counts.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            pixels[..., 0] = 60 * c  # the class shows in the red plane
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.{'png' if i % 3 else 'jpg'}")
    return sorted(p for p in folder.rglob("*") if p.is_file())


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(paths: list[Path], folder: Path, per_shard: int, prefix: str = "",
                 classes: list[str] | None = None) -> list[Path]:
    """`paths` as WebDataset shards of `per_shard` samples: `<key>.<ext>` plus `<key>.cls`
    (the class folder's position in `classes`; no `.cls` when None)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, start in enumerate(range(0, len(paths), per_shard)):
        shard = folder / f"{prefix}{n:06d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i, path in enumerate(paths[start:start + per_shard], start):
                key = f"sample{i:05d}"
                add_member(tar, f"{key}.{path.suffix[1:]}", path.read_bytes())
                if classes is not None:
                    add_member(tar, f"{key}.cls", str(classes.index(path.parent.name)).encode())
        shards.append(shard)
    return shards


def pixels(split, i: int) -> np.ndarray:
    return np.asarray(split[i][0])


def cfg(root, **overrides) -> DataConfig:
    return DataConfig(**{"name": "webdataset", "root": str(root), "val_fraction": 0.25,
                         **overrides})


@pytest.fixture
def labeled(tmp_path):
    """The same 3 x 8 labeled images as a folder and as 4 shards of 6."""
    paths = write_images(tmp_path / "folder", {"a": 8, "b": 8, "c": 8})
    shards = write_shards(paths, tmp_path / "shards", per_shard=6, classes=["a", "b", "c"])
    return tmp_path / "folder", tmp_path / "shards", shards


@pytest.mark.parametrize("decode", ["pil", "torchvision"])
def test_shards_give_the_images_and_labels_of_the_same_folder(labeled, decode):
    folder, shards, _ = labeled
    from_folder = build_dataset(DataConfig(name="image_folder", root=str(folder),
                                           val_fraction=0.25, decode=decode))
    from_shards = build_dataset(cfg(shards, decode=decode))
    assert from_shards.num_classes == 3 and from_shards.class_names == ["0", "1", "2"]
    # the images' own size, read from the headers of their stored bytes, as from the files
    assert (from_shards.channels, from_shards.image_size, from_folder.image_size) == (3, 20, 20)
    assert from_shards.split_hashes == from_folder.split_hashes  # the same carve
    to_tensor = ToUint8Tensor(16)
    for name in ("train", "val", "test"):
        a, b = getattr(from_folder, name), getattr(from_shards, name)
        assert b.labels.tolist() == a.labels.tolist()
        for i in range(len(a)):
            assert b[i][1] == a[i][1] and isinstance(b[i][1], int)
            assert np.array_equal(pixels(b, i), pixels(a, i))
            assert torch.equal(to_tensor(b[i][0]), to_tensor(a[i][0]))


def test_split_by_shard_name_prefix_and_brace_patterns(tmp_path):
    paths = write_images(tmp_path / "folder", {"a": 6, "b": 6})
    classes = ["a", "b"]
    train = write_shards(paths[::2] + paths[1::4], tmp_path / "shards", 3, "train-", classes)
    write_shards(paths[3::4], tmp_path / "shards", 2, "val-", classes)
    bundle = build_dataset(cfg(tmp_path / "shards"))
    # val from the val- shards; test carved from the 9 train samples (20%, rounded up)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (7, 3, 2)
    assert bundle.val.labels.tolist() == [0, 1, 1]  # a/003, b/001, b/005
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    assert len(train) == 3
    bundle = build_dataset(cfg(pattern))  # train shards only: val and test carved
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 9


def test_shards_without_cls_are_unlabeled(tmp_path):
    paths = write_images(tmp_path / "folder", {"x": 10})
    shards = write_shards(paths, tmp_path / "shards", 4)
    bundle = build_dataset(cfg(tmp_path / "shards"))
    assert not bundle.labeled and bundle.class_names is None and bundle.test is None
    assert (len(bundle.train), len(bundle.val)) == (7, 3)
    assert set(bundle.train.labels.tolist()) == {UNLABELED}
    one = build_dataset(cfg(shards[0]))  # data.root may name a single shard
    assert one.train.source.shards == [shards[0]] and len(one.train) + len(one.val) == 4


def test_the_index_is_cached_reused_and_rebuilt_when_a_shard_changes(labeled, monkeypatch):
    _, folder, shards = labeled
    calls = []
    index_shard = wds.index_shard
    monkeypatch.setattr(wds, "index_shard", lambda shard: calls.append(shard) or index_shard(shard))
    first = build_dataset(cfg(folder))
    assert sorted(calls) == shards and all(Path(f"{s}.index.npz").is_file() for s in shards)
    calls.clear()
    again = build_dataset(cfg(folder))
    assert calls == []  # every index read from its cache
    assert again.split_hashes == first.split_hashes
    # a rewritten shard (other content, size and mtime) is indexed again; the others are not
    with tarfile.open(shards[1], "a") as tar:
        add_member(tar, "extra.png", (folder.parent / "folder" / "a" / "001.png").read_bytes())
        add_member(tar, "extra.cls", b"0")
    changed = build_dataset(cfg(folder))
    assert calls == [shards[1]]
    assert sum(len(getattr(changed, s)) for s in ("train", "val", "test")) == 25
    calls.clear()
    os.utime(shards[2], ns=(1, 1))  # only the mtime: indexed again
    build_dataset(cfg(folder))
    assert calls == [shards[2]]


def test_a_read_only_shard_folder_caches_its_index_elsewhere(labeled, tmp_path, monkeypatch):
    _, folder, shards = labeled
    for shard in shards:  # a directory where the index would go: writing there fails
        Path(f"{shard}.index.npz").mkdir()
    monkeypatch.setattr(wds, "FALLBACK_INDEX_DIR", tmp_path / "cache")
    build_dataset(cfg(folder))
    assert len(list((tmp_path / "cache").glob("*.index.npz"))) == len(shards)
    monkeypatch.setattr(wds, "index_shard", lambda shard: pytest.fail("index not reused"))
    build_dataset(cfg(folder))


def test_workers_read_with_their_own_file_handles(labeled):
    _, folder, _ = labeled
    train = build_dataset(cfg(folder, decode="torchvision")).train
    source = train.source
    source[0]  # the main process opens a handle before the workers fork
    dataset = [(ToUint8Tensor(16)(train[i][0]), train[i][1]) for i in range(len(train))]
    from ssl_pipeline.data import TransformedDataset

    loader = torch.utils.data.DataLoader(TransformedDataset(train, ToUint8Tensor(16)),
                                         batch_size=4, num_workers=2)
    images, labels = zip(*[(x, y) for xb, yb in loader for x, y in zip(xb, yb)])
    assert [int(y) for y in labels] == [y for _, y in dataset]
    assert all(torch.equal(a, b) for a, (b, _) in zip(images, dataset))
    copy = pickle.loads(pickle.dumps(source))  # spawned workers: no handles travel
    assert copy._handles == {} and np.array_equal(np.asarray(copy[3][0]),
                                                  np.asarray(source[3][0]))


# ------------------------------------------------------------------ errors


def test_no_shards_is_an_error_saying_what_to_point_at(tmp_path):
    with pytest.raises(SSLPipelineError, match="no .tar shards found"):
        build_dataset(cfg(tmp_path))
    with pytest.raises(SSLPipelineError, match="needs data.root"):
        build_dataset(DataConfig(name="webdataset"))
    with pytest.raises(SSLPipelineError, match=r"3 of the 3 shards .* do not exist"):
        build_dataset(cfg(tmp_path / "s-{0..2}.tar"))


def test_a_file_that_is_not_a_tar_names_the_shard(labeled):
    _, folder, _ = labeled
    (folder / "notes.tar").write_text("this is not a tar file\n" * 100)
    with pytest.raises(SSLPipelineError, match=r"notes.tar is not a readable tar shard.*re-create"):
        build_dataset(cfg(folder))


@pytest.mark.parametrize("cut", ["inside_a_member", "at_a_member_boundary"])
def test_a_truncated_shard_names_the_shard(labeled, cut):
    _, folder, shards = labeled
    data = shards[2].read_bytes()
    with tarfile.open(shards[2]) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + last.size // 2 if cut == "inside_a_member" else last.offset
    shards[2].write_bytes(data[:end])
    with pytest.raises(SSLPipelineError, match=f"{shards[2].name}.*(cut short|re-create)"):
        build_dataset(cfg(folder))


def test_a_sample_without_an_image_names_the_sample(tmp_path):
    paths = write_images(tmp_path / "folder", {"a": 4, "b": 4})
    shard = write_shards(paths, tmp_path / "shards", 8, classes=["a", "b"])[0]
    with tarfile.open(shard, "a") as tar:
        add_member(tar, "orphan.cls", b"1")
        add_member(tar, "orphan.txt", b"a caption, but no image")
    message = r"sample 'orphan' has no image \(members: cls, txt\)"
    with pytest.raises(SSLPipelineError, match=message):
        build_dataset(cfg(tmp_path / "shards"))


@pytest.mark.parametrize("label, message",
                         [(b"cat", "class numbers"), (None, "label every sample")])
def test_bad_or_missing_labels_are_errors(tmp_path, label, message):
    paths = write_images(tmp_path / "folder", {"a": 4, "b": 4})
    shard = write_shards(paths, tmp_path / "shards", 8, classes=["a", "b"])[0]
    with tarfile.open(shard, "a") as tar:
        add_member(tar, "odd.jpg", paths[0].read_bytes())
        if label is not None:
            add_member(tar, "odd.cls", label)
    with pytest.raises(SSLPipelineError, match=message):
        build_dataset(cfg(tmp_path / "shards"))


def test_a_shard_prefix_mix_is_an_error(labeled):
    _, folder, shards = labeled
    shards[0].rename(folder / "train-000000.tar")
    with pytest.raises(SSLPipelineError, match="has no train-/val-/test- name prefix"):
        build_dataset(cfg(folder))


# ------------------------------------------------------------------ end to end


def test_a_tiny_run_end_to_end_on_shards(labeled, tmp_path, tiny_overrides):
    _, folder, _ = labeled
    result = ssl_pipeline.run(
        ROOT / "recipes/quickstart.yaml",
        overrides=[*tiny_overrides, "data.name=webdataset", f"data.root={folder}",
                   "data.val_fraction=0.25", "stages=[pretrain]", "pretrain.epochs=1",
                   "pretrain.batch_size=8"],
        out_dir=tmp_path / "run", quiet=True,
    )
    pretrain = result.results["pretrain"]
    assert pretrain["steps"] > 0  # device views from torchvision-decoded tensors
    assert pretrain["monitor_knn_top1_by_epoch"]  # the eval transform on Pillow's pixels
    assert (result.run_dir / "backbone.safetensors").is_file()
    decoder = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())["resolved"]["data"]["decoder"]
    assert decoder["decode"] == "auto" and "pillow_simd" in decoder  # recorded with the run
