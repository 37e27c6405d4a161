"""Decode throughput per DataLoader worker: our torchvision.io path against PIL's.

Images per second through a DataLoader (batch 32) that turns photo-like JPEG files into
uint8 tensors `(3, 224, 224)` (short side resized to 224, bilinear antialiased, centre crop):
the worker step of the device-view pretraining path. Side by side in one run, with 0, 1 and 2
workers, on the same files:

- reference: torchvision's `ImageFolder` with `Resize(224), CenterCrop(224), PILToTensor()`,
  i.e. PIL decode and PIL resize, as a torchvision classification script would read them;
- ours, PIL (`data.decode: pil`): `image_folder` + `ToUint8Tensor`, Pillow decoding;
- ours, files (`data.decode: torchvision`, auto's choice here): `image_folder` +
  `ToUint8Tensor`, the file bytes decoded by torchvision.io and resized as tensors;
- ours, shards: the same images in WebDataset tar shards (`webdataset`), decoded the same way.

The images: `--images` JPEGs (quality 90) of random width and height in 300-500 px, smooth
colour noise (a random 8 x 8 grid upsampled bicubically) plus fine noise, written to a
temporary directory, in 4 class folders and as tar shards of 100 samples.

Each loader is persistent (its workers start once) and runs one untimed pass (start-up, page
cache, index), then `--repeats` timed passes over all images, the paths interleaved so that
other load on the machine hits them alike; the median pass counts. Per worker = images/s
divided by the worker count (0 workers: the main process, torch limited to 1 thread like a
worker). Ratios: ours / reference at the same worker count.

    python -m benchmarks.decode_throughput            # ~2 minutes on 2 cores
    python benchmarks/decode_throughput.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import BenchmarkRun, benchmark_parser, RESULTS_DIR

SIZE = 224
BATCH = 32
CLASSES = 4
PER_SHARD = 100
PATHS = ("reference", "ours_pil", "ours_files", "ours_shards")


# ------------------------------------------------------------------ data


def write_photos(root: Path, images: int, seed: int) -> list[Path]:
    """`images` photo-like JPEGs of 300-500 px sides in `CLASSES` class folders; their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(images):
        width, height = (int(v) for v in rng.integers(300, 501, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            (width, height), Image.BICUBIC)
        fine = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + fine, 0, 255).astype(np.uint8)
        path = root / f"class_{i % CLASSES}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return sorted(paths)


def write_shards(paths: list[Path], folder: Path) -> Path:
    """The images as WebDataset shards `shard-NNNNNN.tar`: `<key>.jpg` and `<key>.cls`."""
    folder.mkdir(parents=True)
    for n, start in enumerate(range(0, len(paths), PER_SHARD)):
        with tarfile.open(folder / f"shard-{n:06d}.tar", "w") as tar:
            for path in paths[start:start + PER_SHARD]:
                for suffix, data in ((".jpg", path.read_bytes()),
                                     (".cls", path.parent.name.split("_")[1].encode())):
                    info = tarfile.TarInfo(f"{path.stem}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


# ------------------------------------------------------------------ the four paths


def whole_source(**options) -> "torch.utils.data.Dataset":  # noqa: F821
    """Every image of a dataset (its source, not a carved split), as `(PIL image, label)`."""
    from ssl_pipeline.data import build_dataset
    from ssl_pipeline.recipe import DataConfig

    # halves carve from as few as 16 images; the carve does not matter, the source is read
    return build_dataset(DataConfig(val_fraction=0.5, test_fraction=0.5, **options)).train.source


def make_datasets(folder: Path, shards: Path) -> dict:
    import torchvision
    from torchvision import transforms as T  # the classic (v1) transforms: the lighter calls

    from ssl_pipeline.data import TransformedDataset
    from ssl_pipeline.data.device_views import ToUint8Tensor

    reference = torchvision.datasets.ImageFolder(
        str(folder), transform=T.Compose([T.Resize(SIZE), T.CenterCrop(SIZE), T.PILToTensor()]))
    ours = {
        "ours_pil": dict(name="image_folder", root=str(folder), decode="pil"),
        "ours_files": dict(name="image_folder", root=str(folder), decode="torchvision"),
        "ours_shards": dict(name="webdataset", root=str(shards), decode="torchvision"),
    }
    return {"reference": reference,
            **{name: TransformedDataset(whole_source(**options), ToUint8Tensor(SIZE))
               for name, options in ours.items()}}


def check_outputs(sets: dict) -> dict:
    """Largest difference, in gray levels, of each path's first image from ours with PIL.

    Ours agree within the resize's 1 gray level (tests/test_decode.py). The reference differs
    by up to a pixel of geometry: `Resize` truncates the long side and `CenterCrop` rounds its
    offset where `ToUint8Tensor` rounds the side and floors the offset; the work is the same.
    """
    first = {name: dataset[0][0] for name, dataset in sets.items()}
    pil = first["ours_pil"].int()
    return {name: int((x.int() - pil).abs().max()) for name, x in first.items()}


def time_passes(loaders: dict, repeats: int) -> dict:
    """Seconds of each timed pass per path, the paths interleaved within each repeat."""
    seconds = {name: [] for name in loaders}
    for name, loader in loaders.items():  # untimed: worker start-up, page cache, first batches
        for _ in loader:
            pass
    for _ in range(repeats):
        for name, loader in loaders.items():
            start = time.perf_counter()
            for _ in loader:
                pass
            seconds[name].append(time.perf_counter() - start)
    return seconds


def measure(sets: dict, workers: int, repeats: int) -> dict:
    import torch

    loaders = {name: torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers,
                                                 persistent_workers=workers > 0)
               for name, dataset in sets.items()}
    seconds = time_passes(loaders, repeats)
    (images,) = {len(dataset) for dataset in sets.values()}  # the same files on every path
    rows = {}
    for name, times in seconds.items():
        per_second = images / statistics.median(times)
        rows[name] = {"images_per_second": round(per_second, 1),
                      "images_per_second_per_worker": round(per_second / max(1, workers), 1),
                      "pass_seconds": [round(t, 3) for t in times]}
    del loaders  # stops the persistent workers
    reference = rows["reference"]["images_per_second"]
    ratios = {name: round(rows[name]["images_per_second"] / reference, 2) for name in PATHS[1:]}
    return {"workers": workers, "rows": rows, "ratios_over_reference": ratios}


def print_case(case: dict) -> None:
    w = case["workers"]
    print(f"\n{w} worker(s){' (main process)' if w == 0 else ''}")
    print(f"{'path':<14} {'images/s':>9} {'per worker':>11}  {'ours / reference':>16}")
    for name, row in case["rows"].items():
        ratio = case["ratios_over_reference"].get(name)
        shown = "" if ratio is None else f"x{ratio:.2f}"
        print(f"{name:<14} {row['images_per_second']:>9.1f} "
              f"{row['images_per_second_per_worker']:>11.1f}  {shown:>16}")


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--images", type=int, default=500, help="JPEG files to write and read")
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per path (median counts)")
    if p.parse_known_args(argv)[0].quick:  # smaller defaults; values given explicitly still win
        p.set_defaults(images=64, workers="0,1", repeats=1)
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w]
    if args.images < 4 * CLASSES or args.repeats < 1 or min(args.workers) < 0:
        p.error(f"--images must be at least {4 * CLASSES}, --repeats at least 1, workers >= 0")
    name = "decode_throughput_quick.json" if args.quick else "decode_throughput.json"
    args.out = args.out or RESULTS_DIR / name
    return args


def main(argv=None) -> dict:
    import torch

    from ssl_pipeline.data.image_folder import decoder_facts

    args = parse_args(argv)
    torch.set_num_threads(1)  # the main process decodes like one worker (workers use 1 thread)
    run = BenchmarkRun("decode_throughput", args)
    with tempfile.TemporaryDirectory(prefix="decode_throughput_") as tmp:
        paths = write_photos(Path(tmp) / "images", args.images, seed=0)
        shards = write_shards(paths, Path(tmp) / "shards")
        sets = make_datasets(Path(tmp) / "images", shards)
        max_diff = check_outputs(sets)
        print(f"{args.images} JPEGs, 300-500 px -> uint8 (3, {SIZE}, {SIZE}); largest difference "
              f"from ours_pil on the first image, gray levels: {max_diff}")
        cases = []
        for workers in args.workers:
            cases.append(measure(sets, workers, args.repeats))
            print_case(cases[-1])
    result = run.finish({
        "decoder": decoder_facts("torchvision"),
        "setup": {"images": args.images, "image_sides_px": [300, 500], "jpeg_quality": 90,
                  "output": [3, SIZE, SIZE], "batch": BATCH, "shard_samples": PER_SHARD,
                  "repeats": args.repeats, "max_difference_from_ours_pil": max_diff},
        "cases": cases,
        "notes": [
            "images_per_second = images / median seconds of one full pass of a persistent"
            " DataLoader, after one untimed pass; per worker = that / max(1, workers).",
            "reference: torchvision ImageFolder + (v1) Resize(224), CenterCrop(224),"
            " PILToTensor(); its geometry differs from ours by up to a pixel (long side"
            " truncated, crop offset rounded), the work is the same.",
            "ours_pil / ours_files: image_folder + ToUint8Tensor with data.decode pil /"
            " torchvision; ours_shards: webdataset (tar shards) with data.decode torchvision.",
            "main process (0 workers) with torch.set_num_threads(1), as in DataLoader workers.",
        ],
    })
    return result


if __name__ == "__main__":
    main()
