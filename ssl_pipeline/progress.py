"""Progress bars for long steps: shown on terminals, silent in CI logs and with --quiet."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def on_terminal(stream=None) -> bool:
    """True when `stream` (default stderr, where our bars go) is a terminal; CI logs and
    redirected output get no bars. Lightning draws its bars on stdout: pass sys.stdout."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(items: Iterable[T], description: str | None, total: int | None = None) -> Iterable[T]:
    """`items`, with a tqdm bar named `description` on terminals; as-is when `description`
    is None (the caller is quiet) or stderr is not a terminal."""
    if description is None or not on_terminal():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, total=total, leave=False, file=sys.stderr)
