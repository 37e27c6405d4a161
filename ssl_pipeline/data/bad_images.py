"""Image files that cannot be read: named when they stop a run, or left out and listed.

`data.on_bad_image` (image_folder and webdataset):

- `error` (default): zero-byte files stop the run before anything is written (a stat per
  file, no decoding); a file that fails to decode when read (corrupt, truncated, not an
  image, pixels we cannot scale faithfully) stops it then, by raising `BadImage`, whose
  message names the file: the CLI exits with status 2, and the checkpoints written so far
  stay (`ssl-pipeline run --resume RUN_DIR` continues once the file is fixed).
- `skip`: every image is decoded once before training (in `data.num_workers` processes),
  the unreadable ones are left out of every split and listed with the reason in the run's
  recipe.yaml and report. The verdicts are cached under `data/cache/image_scan/`, keyed by
  the files' paths, sizes and modification times, so a second run does not decode again.

Readable but unusual files are converted, never clipped: palette, CMYK, RGBA/LA (alpha
dropped), gray (repeated to RGB), 16-bit gray (scaled by 1/257; `image_folder.to_rgb`).
Float pixels and integer pixels outside 16 bits have no fixed range to scale from: bad.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ssl_pipeline.atomic import write_text_atomic
from ssl_pipeline.errors import SSLPipelineError

SOURCE = "ssl_pipeline_source"  # attribute of a lazily decoded PIL image: the file it came from
SCAN_CACHE = Path("data/cache/image_scan")  # relative to the working directory, as cifar's
SCAN_VERSION = 1
# What Pillow and torchvision.io raise for data they cannot decode
READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
               Image.DecompressionBombError, RuntimeError)
LISTED = 1000  # skipped files named in the recipe record; the rest are counted


class BadImage(SSLPipelineError):
    """An image file that cannot be read. Built from one message string, so that a
    DataLoader worker's copy re-raises in the main process as the same type."""


def bad_image(source: object, error: BaseException | str) -> BadImage:
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return BadImage(
        f"{source}: cannot read this image ({reason}). Remove or replace the file, then "
        "continue with ssl-pipeline run --resume RUN_DIR (what the run wrote is kept); or "
        "start a new run with --set data.on_bad_image=skip to leave unreadable files out "
        "(they are listed in the report)"
    )


def source_of(image: object) -> str | None:
    """The file a PIL image was read from, when it was opened lazily by our readers."""
    return getattr(image, SOURCE, None)


def check_file(path: str | os.PathLike) -> str | None:
    """None when the file decodes to pixels we can use, else the reason it does not."""
    from ssl_pipeline.data.dicom import is_dicom, read_dicom
    from ssl_pipeline.data.image_folder import to_rgb

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings (EXIF, palette transparency)
            if is_dicom(path):
                to_rgb(read_dicom(path))
                return None
            with Image.open(path) as image:
                image.load()  # the whole file: a truncated one fails here
                to_rgb(image)
    except READ_ERRORS as error:
        return f"{type(error).__name__}: {error}"
    return None


def empty_files(paths: list[Path]) -> list[Path]:
    return [path for path in paths if path.stat().st_size == 0]


def refuse_empty(paths: list[Path]) -> None:
    """`on_bad_image=error`: zero-byte files stop the run before it starts."""
    empty = empty_files(paths)
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise BadImage(
            f"{len(empty)} empty image file(s) (0 bytes): {shown}. Remove or replace them, or "
            "set data.on_bad_image=skip to leave unreadable files out (listed in the report)"
        )


def scan(paths: list[Path], workers: int = 0, quiet: bool = False,
         check: Callable[[str], str | None] = check_file) -> dict[str, str]:
    """`{path: reason}` of the unreadable files among `paths`, from the cache when the same
    files (paths, sizes, modification times) were scanned before by the same `check` (a
    module-level function: it runs in worker processes)."""
    stats = [path.stat() for path in paths]
    digest = hashlib.sha256(f"v{SCAN_VERSION}|{check.__module__}.{check.__qualname__}".encode())
    for path, stat in zip(paths, stats):
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    cache = SCAN_CACHE / f"{digest.hexdigest()[:24]}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())["bad"]
        except (OSError, ValueError, KeyError):
            pass  # a torn entry: scanned again and rewritten
    if not quiet:
        print(f"data: decoding {len(paths)} images once to find unreadable ones "
              "(data.on_bad_image=skip)", flush=True)
    names = [str(path) for path in paths]
    if workers > 0 and len(names) > 256:
        with ProcessPoolExecutor(workers) as pool:
            reasons = list(pool.map(check, names, chunksize=64))
    else:
        reasons = [check(name) for name in names]
    bad = {name: reason for name, reason in zip(names, reasons) if reason is not None}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache, json.dumps({"files": len(names), "bad": bad}))
    except OSError:
        pass  # a read-only working directory: scanned again next time
    return bad


def skipped_record(bad: dict[str, str]) -> dict:
    """What the run records about the skipped files: their number and (most of) the list."""
    files = [{"path": path, "reason": reason} for path, reason in sorted(bad.items())[:LISTED]]
    return {"count": len(bad), "files": files}
