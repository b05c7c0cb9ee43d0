"""The one error type for bad data: it says where (source, row, field), what is wrong, and the fix.

A malformed row deep inside a 20,000-row data set must be a one-line fix for the user, so every
message reads like

    dpo.jsonl row 17, field 'chosen': expected a string or a list of {role, content} messages,
    got int 3. Fix the row or drop it.

Row numbers are 0-based positions in the loaded split, i.e. ``dataset[17]`` after
``datasets.load_dataset(...)``; for a JSON Lines file without blank lines, row r is line r + 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_FIX = "Fix the row or drop it."


class DataError(ValueError):
    """A source or one of its rows cannot be converted into examples.

    Attributes keep the parts of the message so callers (and tests) need not parse it:
    ``source`` (file path, folder, or ``"hub/id (split 'x')"``), ``rows`` (the offending row
    numbers, empty for a source-level problem), ``field``, ``problem`` and ``fix``.
    """

    def __init__(
        self,
        source: str,
        problem: str,
        *,
        row: int | Sequence[int] | None = None,
        field: str | None = None,
        fix: str = DEFAULT_FIX,
        line: int | None = None,
    ):
        self.source = source
        self.rows: tuple[int, ...] = () if row is None else ((row,) if isinstance(row, int) else tuple(row))
        self.field = field
        self.problem = problem
        self.fix = fix
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.source
        if self.line is not None:
            where += f" line {self.line}"
        if len(self.rows) == 1:
            where += f" row {self.rows[0]}"
        elif self.rows:
            where += " rows " + ", ".join(str(r) for r in self.rows[:-1]) + f" and {self.rows[-1]}"
        if self.field is not None:
            where += f", field '{self.field}'"
        fix = f" {self.fix}" if self.fix else ""
        return f"{where}: {self.problem.rstrip('.')}.{fix}"


def describe(value: Any, limit: int = 60) -> str:
    """A short 'type value' description for messages, e.g. ``int 3`` or ``str 'hello…'``."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(value).__name__} {text}"


class FieldProblem(Exception):
    """A problem with one field of the row being converted, raised by the conversion helpers.

    They do not know the source or the row number; the adapter context that runs them
    (``AdapterContext.at``) turns this into a :class:`DataError` that names both.
    """

    def __init__(self, field: str | None, problem: str, fix: str = DEFAULT_FIX):
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"field {field!r}: {problem}")
