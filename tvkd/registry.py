"""One small generic registry: name -> object, with metadata given at registration.

Used for aux rewards, losses, evaluators, studies and tables. An unknown name fails with the
list of valid names and a "did you mean" suggestion, so a typo in a config is a one-line fix.

Discovery. A registry may be told where its plug-ins live (`Discovery`): packages whose every
module is imported, and a Python entry-point group through which an installed package adds its
own. Discovery runs once, on the first lookup, so importing the registry costs nothing and a
plug-in module may import the registry without an import cycle. A plug-in module that fails to
import is an error naming its file; it is never silently left out.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class PluginImportError(ImportError):
    """A plug-in module (or entry point) failed to import; the message names its file and the cause."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Discovery:
    """Where a registry's plug-ins live.

    packages: dotted names of packages whose every module (recursively, except those whose name
        starts with ``_``) is imported; importing a module is what registers its plug-ins.
    entry_points: an entry-point group (``[project.entry-points."<group>"]`` in a pyproject); each
        entry names a module (imported, and if it is a package, every module in it) or an object.
    """

    packages: tuple[str, ...] = ()
    entry_points: str | None = None


def import_module_named(module: str) -> Any:
    """Import a module, turning any failure into a `PluginImportError` naming its file."""
    try:
        return importlib.import_module(module)
    except PluginImportError:
        raise
    except Exception as e:  # a plug-in's own bug: name the file, keep the cause
        spec = None
        try:
            spec = importlib.util.find_spec(module)
        except Exception:  # noqa: BLE001 - the parent package itself may be what fails
            pass
        where = getattr(spec, "origin", None) or module
        raise PluginImportError(f"plug-in module {module!r} ({where}) failed to import: "
                                f"{type(e).__name__}: {e}") from e


def import_package_modules(package: str) -> list[str]:
    """Import a package and every module under it (names starting with ``_`` are skipped)."""
    pkg = import_module_named(package)
    names = [package]
    for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), prefix=package + "."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        import_module_named(info.name)
        names.append(info.name)
    return names


def load_entry_points(group: str) -> list[str]:
    """Load every entry point of a group; a module entry is imported with its submodules."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=group):
        module, _, attr = ep.value.partition(":")
        module = module.strip()
        try:
            if attr:
                ep.load()
            else:
                import_package_modules(module)
        except PluginImportError as e:
            raise PluginImportError(f"entry point {ep.name!r} of group {group!r}: {e}") from e
        except Exception as e:  # noqa: BLE001
            raise PluginImportError(f"entry point {ep.name!r} = {ep.value!r} of group {group!r} failed to load: "
                                    f"{type(e).__name__}: {e}") from e
        loaded.append(ep.value)
    return loaded


class Registry(Generic[T]):
    """A named collection of plug-ins.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("dpo", needs=("reference",))
    ... def dpo(batch): ...
    >>> LOSSES.meta("dpo")["needs"]
    ('reference',)
    """

    def __init__(self, kind: str, discovery: Discovery | None = None):
        self.kind = kind
        self.discovery = discovery
        self._entries: dict[str, Entry[T]] = {}
        self._discovered = discovery is None
        self._discovering = False

    # -- registration ------------------------------------------------------------------------

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return decorator

    def add(self, name: str, obj: T, **meta: Any) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries and self._entries[name].obj is not obj:
            old = self._entries[name].obj
            if _where(old) != _where(obj):  # a module imported twice under one name re-registers itself
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {_where(old)}); pick another name"
                )
        self._entries[name] = Entry(name, obj, dict(meta))

    def remove(self, name: str) -> None:
        """Unregister a plug-in (tests and interactive sessions)."""
        self._entries.pop(name, None)

    # -- discovery ---------------------------------------------------------------------------

    def discover(self) -> None:
        """Import every plug-in module (once); later calls do nothing."""
        if self._discovered or self._discovering:
            return
        self._discovering = True
        try:
            for package in self.discovery.packages:
                import_package_modules(package)
            if self.discovery.entry_points:
                load_entry_points(self.discovery.entry_points)
            self._discovered = True
        finally:
            self._discovering = False

    # -- lookup ------------------------------------------------------------------------------

    def _entry(self, name: str) -> Entry[T]:
        self.discover()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        self.discover()
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
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)

    def names(self) -> list[str]:
        self.discover()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self.discover()
        return [(e.name, e.obj) for e in self._entries.values()]

    def where(self, name: str) -> str:
        """The module and qualified name that registered `name`."""
        return _where(self.get(name))


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
