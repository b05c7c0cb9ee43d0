"""Config value checks that need neither torch nor transformers: `ConfigError` and the typed reading of
one YAML value (`check_value`) or one mapping of fields (`checked_fields`).

They live apart from `tvkd.api` (which re-exports them) so that a wrong value in a run config is
answered before torch is imported (~3 s on a CPU machine); only a loss's own options need the loss
classes, and with them torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    args = typing.get_args(hint)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _given(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def check_value(value: Any, hint: Any, where: str) -> Any:
    """`value` as the annotated type `hint` (int -> float widening, whole floats -> int), or a ConfigError.

    A string where a number belongs is refused, not parsed: YAML's ``"0.1"`` is a quoted string,
    and silently reading it as a number would hide a typo such as ``1e-4O``.
    """
    args = typing.get_args(hint)
    if args and type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007 - built at run time
        args = typing.get_args(hint)
    if hint is Any:
        return value
    if args:  # a union of several types: the first that accepts the value
        for a in args:
            try:
                return check_value(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {_given(value)}")
    origin = typing.get_origin(hint) or hint
    ok = True
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    elif origin is str:
        ok = isinstance(value, str)
    elif origin in (list, tuple):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    elif origin is dict:
        ok = isinstance(value, dict)
    if not ok:
        fix = " (write it without quotes)" if isinstance(value, str) and origin in (int, float, bool) else ""
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {_given(value)}{fix}")
    return value


def checked_fields(cls: type, data: dict[str, Any], key_prefix: str, what: str = "key") -> dict[str, Any]:
    """`data` with every value checked against `cls`'s field annotations; unknown keys are named.

    Messages start with ``<key_prefix><key>``, e.g. ``my.yaml: train.learning_rate``.
    """
    import difflib

    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key_prefix}{key}: unknown {what}; valid {what}s: {', '.join(fields)}.{hint}")
        out[key] = check_value(value, hints[key], f"{key_prefix}{key}")
    return out
