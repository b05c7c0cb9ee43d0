"""One small generic registry: name -> object, with metadata given at registration.

Used for aux rewards, losses, evaluators, studies and tables. An unknown name fails with the
list of valid names and a "did you mean" suggestion, so a typo in a config is a one-line fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A named collection of plug-ins.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("dpo", needs=("reference",))
    ... def dpo(batch): ...
    >>> LOSSES.meta("dpo")["needs"]
    ('reference',)
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return decorator

    def add(self, name: str, obj: T, **meta: Any) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries and self._entries[name].obj is not obj:
            raise ValueError(
                f"{self.kind} {name!r} is already registered (by {_where(self._entries[name].obj)}); "
                f"pick another name"
            )
        self._entries[name] = Entry(name, obj, dict(meta))

    def _entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        valid = sorted(self._entries)
        msg = f"unknown {self.kind} {name!r}; valid {self.kind} names: {', '.join(valid) or '(none)'}"
        close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
        if close:
            msg += f". Did you mean {close[0]!r}?"
        return msg

    def get(self, name: str) -> T:
        return self._entry(name).obj

    def meta(self, name: str) -> dict[str, Any]:
        return self._entry(name).meta

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(e.name, e.obj) for e in self._entries.values()]


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
