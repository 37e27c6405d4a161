"""EuroSAT: Sentinel-2 land cover, 10 classes, 27,000 tiles of 64 x 64 px (Helber et al. 2019).

`data.eurosat.bands` chooses the release:

- `rgb`: the JPEG release (`EuroSAT_RGB/` or `2750/`: `<Class>/<Class>_<n>.jpg`), read like any
  class-folder of photos, as 8-bit RGB.
- `ms`: the multispectral release (`EuroSAT_MS/`, `EuroSATallBands/`, or the zip's
  `ds/images/remote_sensing/otherDatasets/sentinel_2/tif/`): `<Class>/<Class>_<n>.tif`, 13 bands
  of 16-bit digital numbers. The files store the bands as B01, B02, B03, B04, B05, B06, B07, B08,
  B09, B10, B11, B12, **B8A** (B8A last, not in wavelength order: a known trap). A list of band
  names (`[B04, B03, B02, B08]`) keeps those bands, in that order.

Multispectral tiles are read with tifffile (or rasterio, when only it is installed), bands
first or last, whichever way the file holds them. `data.eurosat.band_order` decides the order
the backbone sees: `wavelength` (default: B01 ... B08, B8A, B09 ... B12, the order of
Sentinel-2 products and of most multispectral pretrained weights) or `stored` (the file's,
B8A last, as torchgeo's EuroSAT gives it). The names, in the order the backbone sees them, are
recorded in the run (`resolved.data.bands`, and in backbone.json beside the weights).

Digital numbers become reflectance by dividing by 10,000 (Sentinel-2 L1C's quantification
value), in float32, never clipped (bright clouds exceed 1). Normalization is per band: mean and
std of each band over (a seeded sample of up to `STATS_SAMPLE` files of) the train split,
measured once and cached under `data/cache/eurosat_stats/` (keyed by the files and bands).

EuroSAT has no official split: train/val/test are carved stratified and seeded
(`data.split_seed`, `data.val_fraction`, `data.test_fraction`), unless the folder (or the one
above it) holds torchgeo's split lists `eurosat-train.txt`, `eurosat-val.txt` and
`eurosat-test.txt` (file names, one per line; `.tif` and `.jpg` names match either release).

`data.root` is the class-folder directory or a folder holding one of the release folders above;
by default `data/cache/eurosat/`. `data.download: true` fetches the RGB release with
torchvision (needs internet); the multispectral release is fetched by hand (see the error).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ssl_pipeline.atomic import write_text_atomic
from ssl_pipeline.data.bad_images import READ_ERRORS, bad_image, skipped_record
from ssl_pipeline.data.base import DataBundle, Split, datasets
from ssl_pipeline.data.image_folder import Screen, label_images, list_images, photo_bundle
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.names import DATASET_DESCRIPTIONS

CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
           "PermanentCrop", "Residential", "River", "SeaLake")
STORED_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11",
                "B12", "B8A")
WAVELENGTH_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
                    "B11", "B12")
REFLECTANCE_SCALE = 10_000.0  # Sentinel-2 L1C: reflectance = digital number / 10,000
STATS_SAMPLE = 2000  # files read for the per-band normalization statistics
STATS_CACHE = Path("data/cache/eurosat_stats")  # relative to the working directory, as the scan's
STATS_VERSION = 1
IMAGE_SIZE = 64
DEFAULT_ROOT = Path("data/cache/eurosat")
RELEASE_FOLDERS = {
    "rgb": ("EuroSAT_RGB", "2750", "eurosat/2750", "EuroSAT"),
    "ms": ("EuroSAT_MS", "EuroSATallBands", "ds/images/remote_sensing/otherDatasets/sentinel_2/tif",
           "EuroSATallBands/ds/images/remote_sensing/otherDatasets/sentinel_2/tif"),
}
SPLIT_LISTS = {"train": "eurosat-train.txt", "val": "eurosat-val.txt", "test": "eurosat-test.txt"}
MS_SUFFIXES = (".tif", ".tiff")
RGB_SUFFIXES = (".jpg", ".jpeg", ".png")


@datasets.register("eurosat", DATASET_DESCRIPTIONS["eurosat"])
def build_eurosat(cfg) -> DataBundle:
    bands = cfg.eurosat.bands
    multispectral = bands != "rgb"
    folder = find_folder(cfg.root, "ms" if multispectral else "rgb", cfg.download)
    suffixes = MS_SUFFIXES if multispectral else RGB_SUFFIXES
    paths = [p for p in list_images(folder) if p.suffix.lower() in suffixes]
    names = [p.relative_to(folder).parts[0] for p in paths]
    flat = [p for p in paths if len(p.relative_to(folder).parts) == 1]
    if not paths or flat:
        raise SSLPipelineError(
            f"{folder} does not hold EuroSAT's class folders (<Class>/<Class>_<n>"
            f"{suffixes[0]}): " + ("no such files" if not paths else f"{flat[0]} lies outside one")
        )
    classes = sorted(set(names))
    if multispectral:
        selected = select_bands(bands, cfg.eurosat.band_order)
        screen = Screen(cfg, check=check_tile)
        paths, names = screen(folder, paths, names)
        index = {name: i for i, name in enumerate(classes)}
        source = BandFiles(paths, np.array([index[n] for n in names]), selected)
    else:
        screen = Screen(cfg)
        paths, names = screen(folder, paths, names)
        source = label_images(folder, paths, names, classes, decode="pil")
    given = listed_splits(folder, source)
    if given:
        bundle = listed_bundle(source, given, classes, str(folder), screen)
    else:
        bundle = photo_bundle("eurosat", cfg, source, {}, classes, source=str(folder),
                              skipped=screen.bad, image_size=IMAGE_SIZE)
    what = f"ms:{','.join(selected)}" if multispectral else "rgb"
    mean, std = normalization_stats(bundle.train, cfg.split_seed, what,
                                    band_stats if multispectral else rgb_stats)
    return dataclasses.replace(
        bundle, name="eurosat", image_size=IMAGE_SIZE, mean=mean, std=std,
        channels=len(selected) if multispectral else 3,
        bands=list(selected) if multispectral else ["B04", "B03", "B02"],
    )


def find_folder(root: str | None, release: str, download: bool) -> Path:
    """The folder holding the class folders of `release` ("rgb" or "ms")."""
    base = Path(root) if root else DEFAULT_ROOT
    candidates = [base] + [base / sub for sub in RELEASE_FOLDERS[release]]
    for folder in candidates:
        if (folder / "Forest").is_dir() and (folder / "SeaLake").is_dir():
            return folder
    if download and release == "rgb":
        return fetch_rgb(base)
    where = "EuroSAT_RGB/ (EuroSAT.zip)" if release == "rgb" else "EuroSAT_MS/ (EuroSATallBands.zip)"
    how = ("set data.download=true to fetch it with torchvision (needs internet), or "
           if release == "rgb" else "")
    raise SSLPipelineError(
        f"EuroSAT ({release}) not found: no class folders (Forest/, SeaLake/, ...) in "
        f"{' or '.join(map(str, candidates[:3]))}. Unzip {where} from "
        "https://zenodo.org/records/7711810 into " + str(base) + ", " + how
        + "or point data.root at the folder holding the class folders"
    )


def fetch_rgb(folder: Path) -> Path:
    import torchvision

    try:
        torchvision.datasets.EuroSAT(str(folder), download=True)
    except Exception as error:
        raise SSLPipelineError(
            f"downloading EuroSAT failed ({type(error).__name__}: {error}); unzip EuroSAT.zip "
            f"into {folder} by hand"
        ) from error
    return folder / "eurosat" / "2750"


def select_bands(bands, order: str) -> tuple[str, ...]:
    """The band names the backbone sees, in its order.

    >>> select_bands("ms", "stored")[-1], select_bands("ms", "wavelength")[8]
    ('B8A', 'B8A')
    >>> select_bands(["B4", "B03", "b02"], "wavelength")
    ('B04', 'B03', 'B02')
    """
    if bands == "ms":
        return STORED_BANDS if order == "stored" else WAVELENGTH_BANDS
    chosen = []
    for band in bands:
        name = str(band).upper()
        name = name if name == "B8A" or len(name) != 2 else f"B0{name[1]}"
        if name not in STORED_BANDS:
            raise SSLPipelineError(
                f"data.eurosat.bands names {band!r}, which is not a Sentinel-2 band; "
                f"use rgb, ms, or names among {', '.join(WAVELENGTH_BANDS)}"
            )
        chosen.append(name)
    if len(set(chosen)) != len(chosen) or not chosen:
        raise SSLPipelineError(f"data.eurosat.bands lists {list(bands)}: give each band once")
    return tuple(chosen)


def read_tile(path: str | Path) -> np.ndarray:
    """A multispectral tile as `(13, H, W)` in the file's band order (bands first or last)."""
    try:
        import tifffile
    except ImportError:
        tifffile = None
    if tifffile is not None:
        array = tifffile.imread(str(path))
    else:
        try:
            import rasterio
        except ImportError:
            raise SSLPipelineError(
                "multispectral EuroSAT needs tifffile (pip install tifffile, or "
                "pip install 'ssl_pipeline[satellite]') or rasterio"
            ) from None
        with rasterio.open(path) as dataset:
            array = dataset.read()  # (bands, H, W)
    if array.ndim != 3 or len(STORED_BANDS) not in (array.shape[0], array.shape[2]):
        raise ValueError(f"a tile of shape {array.shape}, not 13 bands (13, H, W) or (H, W, 13)")
    if array.shape[0] != len(STORED_BANDS):
        array = np.moveaxis(array, 2, 0)
    if array.dtype.kind not in "ui":
        raise ValueError(f"{array.dtype} pixels, not the 16-bit digital numbers EuroSAT stores")
    return array


def check_tile(path: str) -> str | None:
    """For `data.on_bad_image=skip`: None when the tile reads as 13 bands, else why not."""
    try:
        if Path(path).stat().st_size == 0:
            return "empty file (0 bytes)"
        read_tile(path)
    except (ValueError, *READ_ERRORS) as error:
        return f"{type(error).__name__}: {error}"
    return None


class BandFiles(torch.utils.data.Dataset):
    """Multispectral tiles read lazily as float32 reflectance tensors `(C, H, W)`, with labels."""

    def __init__(self, paths: list[Path], labels: np.ndarray, bands: tuple[str, ...]):
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.bands = bands
        self.order = [STORED_BANDS.index(b) for b in bands]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.paths[i]
        try:
            array = read_tile(path)
        except (ValueError, *READ_ERRORS) as error:
            raise bad_image(path, error) from error
        reflectance = array[self.order].astype(np.float32) / np.float32(REFLECTANCE_SCALE)
        return torch.from_numpy(reflectance), int(self.labels[i])


def listed_splits(folder: Path, source) -> dict[str, np.ndarray]:
    """torchgeo's split lists beside the data: `{split: indices into source}`, else {}."""
    for place in (folder, folder.parent):
        files = {split: place / name for split, name in SPLIT_LISTS.items()}
        if all(f.is_file() for f in files.values()):
            break
    else:
        return {}
    index = {Path(p).stem: i for i, p in enumerate(source.paths)}
    given = {}
    for split, file in files.items():
        stems = [Path(line.strip()).stem for line in file.read_text().splitlines() if line.strip()]
        missing = [s for s in stems if s not in index]
        if len(missing) == len(stems):
            raise SSLPipelineError(f"none of the files {file} lists are in {folder}")
        given[split] = np.array(sorted(index[s] for s in stems if s in index), dtype=np.int64)
    return given


def listed_bundle(source, given: dict, classes: list[str], where: str, screen) -> DataBundle:
    return DataBundle(
        name="eurosat",
        train=Split(source, given["train"]),
        val=Split(source, given["val"]),
        test=Split(source, given["test"]),
        num_classes=len(classes),
        class_names=classes,
        channels=3,  # (set by the caller)
        image_size=IMAGE_SIZE,
        mean=(), std=(),  # (set by the caller)
        source=where + " (splits: torchgeo's eurosat-{train,val,test}.txt)",
        skipped_images=skipped_record(screen.bad) if screen.bad else None,
    )


def normalization_stats(split: Split, seed: int, what: str, compute) -> tuple[tuple, tuple]:
    """`compute(images)` over a seeded sample of up to `STATS_SAMPLE` of the split's files.

    The result is kept under `data/cache/eurosat_stats/`, keyed by `what` (the release and
    bands) and the sampled files' paths, sizes and modification times: a second run (and every
    DDP process after the first) reads it instead of the files.
    """
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(split), min(STATS_SAMPLE, len(split)), replace=False))
    digest = hashlib.sha256(f"v{STATS_VERSION}|{what}".encode())
    for i in chosen:
        path = Path(split.source.paths[int(split.indices[i])])
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    cache = STATS_CACHE / f"{digest.hexdigest()[:24]}.json"
    try:
        saved = json.loads(cache.read_text())
        return tuple(saved["mean"]), tuple(saved["std"])
    except (OSError, ValueError, KeyError):
        pass  # not measured yet, or a torn entry: measured again and rewritten
    mean, std = compute([split[int(i)][0] for i in chosen])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache, json.dumps({"what": what, "files": len(chosen),
                                             "mean": mean, "std": std}))
    except OSError:
        pass  # a read-only working directory: measured again next time
    return mean, std


def band_stats(tiles: list[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std of reflectance over `(C, H, W)` tiles."""
    return _moments((tile.double().flatten(1) for tile in tiles), 5)


def rgb_stats(images: list) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in [0, 1] units, over RGB PIL images."""
    planes = (torch.from_numpy(np.asarray(image, dtype=np.float64) / 255.0).flatten(0, 1).T
              for image in images)
    return _moments(planes, 4)


def _moments(planes, digits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std per channel over `(C, pixels)` blocks of any sizes."""
    total = squares = count = 0
    for block in planes:
        total = total + block.sum(dim=1)
        squares = squares + (block ** 2).sum(dim=1)
        count += block.shape[1]
    mean = total / count
    std = (squares / count - mean ** 2).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), digits) for v in mean), tuple(round(float(v), digits) for v in std)
