"""Writes that cannot leave half a file: write beside the target, then rename over it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """Call `write(tmp_path)` on a temporary file next to `path`, then rename it into place;
    on any error the temporary file is removed and `path` keeps its previous content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))
