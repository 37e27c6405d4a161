"""One small generic registry, used for backbones, datasets, methods and stages."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from ssl_pipeline.errors import SSLPipelineError

T = TypeVar("T")


def nearest(name: str, choices: list[str]) -> str | None:
    """The closest valid spelling of `name` among `choices`, or None when nothing is close."""
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return matches[0] if matches else None


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str
    extra: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Maps names to objects (builders, classes) with a one-line description each.

    >>> fruits = Registry("fruit")
    >>> @fruits.register("apple", "a red one")
    ... def make_apple():
    ...     return "apple"
    >>> fruits.get("apple").obj()
    'apple'
    >>> fruits.get("aple")
    Traceback (most recent call last):
    ...
    ssl_pipeline.errors.SSLPipelineError: unknown fruit 'aple'; did you mean 'apple'? Known: apple
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str, **extra: Any) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, description, dict(extra))
            return obj

        return add

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            hint = nearest(name, self.names())
            did_you_mean = f"; did you mean {hint!r}?" if hint else ";"
            raise SSLPipelineError(
                f"unknown {self.kind} {name!r}{did_you_mean} Known: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())
