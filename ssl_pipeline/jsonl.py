"""metrics.jsonl: one JSON object a line, appended as it is logged and read back by the
reports. No torch import, so reading runs back (report, compare) starts fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def to_jsonable(value: Any) -> Any:
    """A torch tensor as a number (one element) or nested lists; anything else as it is."""
    if hasattr(value, "numel") and hasattr(value, "tolist"):  # a tensor, without importing torch
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON object as one line and flush it, so a crash loses at most that line."""
    with open(path, "a") as f:
        f.write(json.dumps({k: to_jsonable(v) for k, v in record.items()}) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl; a torn last line (a run killed mid-write) is skipped, not fatal."""
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
