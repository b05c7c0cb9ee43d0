"""Per-data-set adapters: one function per schema, turning source rows into examples.

An adapter is a generator ``adapter(table, ctx)`` that reads rows through ``ctx.rows(table)``
and yields :class:`PreferenceExample` / :class:`SFTExample` objects, or :class:`Skip` for a
well-formed row without a training signal (counted, never silent). Malformed rows raise
:class:`DataError` naming the source, row and field. Adapters register with their metadata:

* ``kind``: ``"preference"`` or ``"sft"``;
* ``hub_ids``: data sets the adapter is chosen for automatically (a hub id, or a local folder
  whose path ends in it, such as a mirror made with ``huggingface-cli download``);
* ``columns``: alternative column sets that select the adapter when the source has them (the
  adapter with the largest matching set wins; empty: selected only by name or hub id);
* ``split_aliases``: requested split -> the source's split names to try (e.g. HelpSteer2 has
  no test split; its validation split serves as test);
* ``data_dir``: a sub-folder of the repository to load (HelpSteer2's preference file).

Adding a data set is one file in this package (or a module in the ``tvkd.data_adapters`` entry-point
group) with one decorated function; the registry imports every module here on first use, and loaders
pick the adapter up by name, hub id or columns. This module holds what adapters share.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from tqdm.auto import tqdm

from tvkd.data.errors import DEFAULT_FIX, DataError, FieldProblem, describe
from tvkd.data.examples import PreferenceExample
from tvkd.data.messages import preference_from_row, preference_skip_reason
from tvkd.registry import Discovery, Registry

ADAPTERS: Registry = Registry("data adapter", Discovery(packages=("tvkd.data.adapters",),
                                                                  entry_points="tvkd.data_adapters"))


@dataclass(frozen=True)
class Skip:
    """A well-formed row (or pair of rows) that yields no example, and why."""

    reason: str
    rows: tuple[int, ...]


class AdapterContext:
    """What an adapter knows about its source: names for ids and errors, and the row iterator.

    ``label`` names the source in error messages (a file path, or ``"id (split 'x')"``);
    ``name`` and ``split`` build default ids ``f"{name}/{split}/{row}"``; ``requested_split``
    is the split the caller asked for (adapters that select rows by a column use it).
    """

    def __init__(self, label: str, name: str, split: str, requested_split: str, progress: bool = False):
        self.label = label
        self.name = name
        self.split = split
        self.requested_split = requested_split
        self.progress = progress
        self.rows_read = 0

    def rows(self, table: Any, numbers: Sequence[int] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(row_number, row)``; ``numbers`` gives the source row numbers of a selection."""
        numbers = range(len(table)) if numbers is None else numbers
        bar = tqdm(total=len(numbers), desc=f"reading {self.label}", unit="row", disable=not self.progress)
        try:
            for number, row in zip(numbers, table):
                self.rows_read += 1
                bar.update(1)
                yield number, row
        finally:
            bar.close()

    @contextmanager
    def at(self, rows: int | Sequence[int]) -> Iterator[None]:
        """Turn a :class:`FieldProblem` raised inside into a :class:`DataError` naming ``rows``."""
        try:
            yield
        except FieldProblem as p:
            raise DataError(self.label, p.problem, row=rows, field=p.field, fix=p.fix) from None

    def fail(
        self, rows: int | Sequence[int], problem: str, field: str | None = None, fix: str = DEFAULT_FIX
    ) -> NoReturn:
        raise DataError(self.label, problem, row=rows, field=field, fix=fix)

    def default_id(self, row_number: int, split: str | None = None) -> str:
        return f"{self.name}/{split or self.split}/{row_number}"

    def base_meta(self, row_number: int, fmt: str) -> dict[str, Any]:
        return {"format": fmt, "source": self.name, "split": self.split, "row": row_number}


def row_id(row: Mapping[str, Any], fields: Iterable[str] = ("id", "prompt_id")) -> str | None:
    """The row's own id from the first present id column, or None."""
    for field in fields:
        value = row.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise FieldProblem(field, f"an id must be a string or an integer, got {describe(value)}")
        if str(value).strip():
            return str(value)
    return None


def row_meta(row: Mapping[str, Any]) -> dict[str, Any]:
    """The optional ``meta`` column of generic rows (a JSON object)."""
    meta = row.get("meta")
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise FieldProblem("meta", f"expected a JSON object, got {describe(meta)}")
    return dict(meta)


def number_field(row: Mapping[str, Any], field: str, optional: bool = False) -> float | int | None:
    value = row.get(field)
    if value is None and optional:
        return None
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldProblem(field, f"expected a number, got {describe(value)}")
    return value


def integer_field(row: Mapping[str, Any], field: str, low: int, high: int) -> int:
    value = number_field(row, field)
    if value != int(value) or not low <= value <= high:
        raise FieldProblem(field, f"expected an integer from {low} to {high}, got {describe(value)}")
    return int(value)


def string_field(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise FieldProblem(field, "missing or null", "Add the field to the row or drop the row.")
    if not isinstance(value, str):
        raise FieldProblem(field, f"expected a string, got {describe(value)}")
    return value


def preference_example(
    ctx: AdapterContext, row: Mapping[str, Any], number: int, extra_meta: Mapping[str, Any] | None = None
) -> PreferenceExample | Skip:
    """A generic TRL-format row -> example or skip (call inside ``ctx.at(number)``)."""
    prompt, chosen, rejected, fmt = preference_from_row(row)
    reason = preference_skip_reason(prompt, chosen, rejected)
    if reason:
        return Skip(reason, (number,))
    meta = {**row_meta(row), **(extra_meta or {}), **ctx.base_meta(number, fmt)}
    return PreferenceExample(row_id(row) or ctx.default_id(number), prompt, chosen, rejected, meta)
