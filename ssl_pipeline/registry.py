"""One small generic registry, used for backbones, datasets, methods and stages."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from ssl_pipeline.errors import SSLPipelineError

T = TypeVar("T")


def nearest(name: str, choices: list[str]) -> str | None:
    """The closest valid spelling of `name` among `choices`, or None when nothing is close."""
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return matches[0] if matches else None


def load(target: str) -> Any:
    """The object `target` names, "module:attribute", imported."""
    module, attribute = target.split(":")
    return getattr(import_module(module), attribute)


def check_name(kind: str, name: str, names: Sequence[str], registry: str | None = None) -> None:
    """Raise, naming the nearest of `names` and all of them, unless `name` is one of them or,
    given `registry` ("module:attribute", imported only then), registered there."""
    if name in names:
        return
    if registry is not None:
        names = load(registry).names()
    if name not in names:
        hint = nearest(name, list(names))
        did_you_mean = f"; did you mean {hint!r}?" if hint else ";"
        raise SSLPipelineError(f"unknown {kind} {name!r}{did_you_mean} Known: {', '.join(sorted(names))}")


@dataclass
class Entry(Generic[T]):
    """A registered object, its name and one-line description. A lazy entry names its object
    as `target` ("module:attribute"), imported the first time `obj` is read."""

    name: str
    loaded: T | None
    description: str
    extra: dict[str, Any] = field(default_factory=dict)
    target: str | None = None

    @property
    def obj(self) -> T:
        if self.loaded is None and self.target is not None:
            self.loaded = load(self.target)
        return self.loaded


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
            self._add(Entry(name, obj, description, dict(extra)))
            return obj

        return add

    def register_lazy(self, name: str, description: str, target: str, **extra: Any) -> None:
        """Register `target` ("module:attribute") without importing it: listing and checking
        names stay fast; the first `get(name).obj` imports it."""
        self._add(Entry(name, None, description, dict(extra), target))

    def _add(self, entry: Entry[T]) -> None:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry

    def get(self, name: str) -> Entry[T]:
        check_name(self.kind, name, self.names())
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())
