"""Load a preference or SFT data set from a hub id or a local file/folder into examples.

    result = load_preferences("argilla/dpo-mix-7k", split="train")
    print(result.summary())
    # argilla/dpo-mix-7k (split 'train', adapter 'dpo_mix_7k'): 6750 rows -> N preference
    # examples; skipped K (reason: count, ...)

Sources:

* a hub id (``datasets.load_dataset(id, split=...)``);
* a local folder laid out like a hub data set repository (``data/train-00000-of-00001.parquet``,
  ``train.jsonl.gz``, a README with ``configs``), loaded the same way; a folder whose path ends
  in a known hub id (``.../nvidia/HelpSteer2``) gets that data set's adapter;
* a local ``.jsonl`` / ``.json`` / ``.parquet`` file (optionally ``.gz``), loaded with the
  ``json`` / ``parquet`` builders. A file holds one split; ``split`` then only names it (and
  selects rows where the format has a split column, as HelpSteer2's preference file does).

The adapter (see :mod:`tvkd.data.adapters`) is the one named by ``adapter=``, else the one
registered for the hub id, else the one whose columns the source has.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvkd.data.adapters import ADAPTERS, AdapterContext, Skip
from tvkd.data.errors import DataError
from tvkd.data.examples import PreferenceExample, SFTExample
from tvkd.data.files import (
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    folder_builder,
    folder_files,
    load_folder,
    load_hub,
    read_file,
)

_EXAMPLE_TYPES = {"preference": PreferenceExample, "sft": SFTExample}


@dataclass
class LoadResult:
    """Examples of one split plus the accounting of what was dropped and why.

    ``num_rows`` counts the source rows read (for HelpSteer2's ratings, two rows per pair);
    ``skipped`` maps a reason to the number of rows or pairs skipped for it; ``split`` is the
    source's split that was actually read (e.g. ``validation`` when ``test`` was asked of
    HelpSteer2); ``duplicate_ids`` counts ids that repeated in the source and got a ``#k`` suffix.
    """

    examples: list[Any]
    skipped: dict[str, int]
    source: str
    num_rows: int
    split: str = "train"
    adapter: str = ""
    duplicate_ids: int = 0
    kind: str = "preference"

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.examples)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line for logs and the CLI, e.g. ``x (split 'train', adapter 'y'): 20 rows -> 18
        examples; skipped 2 (empty_response: 1, identical_pair: 1)``."""
        text = (
            f"{self.source} (split {self.split!r}, adapter {self.adapter!r}): "
            f"{self.num_rows} rows -> {len(self.examples)} {self.kind} examples"
        )
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped {self.num_skipped} ({reasons})"
        if self.duplicate_ids:
            text += f"; {self.duplicate_ids} repeated ids made unique with a '#k' suffix"
        return text


def load_preferences(
    source: str | Path,
    *,
    split: str = "train",
    adapter: str | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> LoadResult:
    """Load preference pairs (:class:`PreferenceExample`) from a hub id, folder or file.

    ``limit`` stops after that many examples (skipped rows do not count); ``progress`` shows a
    progress bar over the source rows. Raises :class:`DataError` for a malformed row or an
    unusable source, and ``UnknownNameError`` for an unknown adapter name.
    """
    return load_source(
        source, split=split, adapter=adapter, limit=limit, progress=progress, kind="preference"
    )


def load_sft(
    source: str | Path,
    *,
    split: str = "train",
    adapter: str | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> LoadResult:
    """Load supervised conversations (:class:`SFTExample`); arguments as :func:`load_preferences`."""
    return load_source(source, split=split, adapter=adapter, limit=limit, progress=progress, kind="sft")


def load_source(
    source: str | Path,
    *,
    split: str = "train",
    adapter: str | None = None,
    limit: int | None = None,
    progress: bool = False,
    kind: str | None = None,
) -> LoadResult:
    """Load any supported source; ``kind`` ("preference" | "sft" | None = whichever the adapter
    produces) restricts which adapters may be chosen."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if kind not in (None, *_EXAMPLE_TYPES):
        raise ValueError(f"kind must be 'preference', 'sft' or None, got {kind!r}")
    src = _Source.parse(source)
    name = _adapter_by_name(adapter, kind, src) if adapter else _adapter_by_hub_id(src.hub_id, kind)
    table, ctx = src.open(split, name, progress)
    if name is None:
        name = _adapter_by_columns(table.column_names, kind, ctx.label)
    else:
        _check_columns(name, table.column_names, ctx.label)
    adapter_kind = ADAPTERS.meta(name)["kind"]
    return _run(ADAPTERS.get(name), name, adapter_kind, table, ctx, str(source), limit)


# --------------------------------------------------------------------------------------------
# Running an adapter


def _run(
    fn: Any, name: str, kind: str, table: Any, ctx: AdapterContext, source: str, limit: int | None
) -> LoadResult:
    examples: list[Any] = []
    skipped: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    duplicates = 0
    expected = _EXAMPLE_TYPES[kind]
    if limit != 0:
        items = fn(table, ctx)
        try:
            for item in items:
                if isinstance(item, Skip):
                    skipped[item.reason] += 1
                    continue
                if not isinstance(item, expected):
                    raise TypeError(
                        f"adapter {name!r} yielded {type(item).__name__}; a {kind} adapter yields {expected.__name__}"
                    )
                seen[item.id] += 1
                if seen[item.id] > 1:
                    # Ids key the tokenized data and the teacher cache, so they must be unique;
                    # some data sets repeat a prompt id across pairs built from the same prompt.
                    duplicates += 1
                    item = dataclasses.replace(item, id=f"{item.id}#{seen[item.id]}")
                examples.append(item)
                if limit is not None and len(examples) >= limit:
                    break
        finally:
            items.close()
    return LoadResult(
        examples=examples,
        skipped=dict(skipped),
        source=source,
        num_rows=ctx.rows_read,
        split=ctx.split,
        adapter=name,
        duplicate_ids=duplicates,
        kind=kind,
    )


# --------------------------------------------------------------------------------------------
# Choosing the adapter


def _kinds_ok(entry_kind: str, kind: str | None) -> bool:
    return kind is None or entry_kind == kind


def _adapter_by_name(name: str, kind: str | None, src: _Source) -> str:
    meta = ADAPTERS.meta(name)  # unknown names fail here, with the valid ones and a suggestion
    if not _kinds_ok(meta["kind"], kind):
        raise DataError(
            src.display,
            f"adapter {name!r} reads {meta['kind']} data, not {kind} data",
            fix=f"Load it as {_as_kind(meta['kind'])}, or pass a {kind} adapter: {', '.join(_names(kind))}.",
        )
    return name


def _adapter_by_hub_id(hub_id: str | None, kind: str | None) -> str | None:
    if hub_id is None:
        return None
    for name in ADAPTERS:
        meta = ADAPTERS.meta(name)
        if hub_id in meta.get("hub_ids", ()) and _kinds_ok(meta["kind"], kind):
            return name
    return None


def _best_by_columns(have: set[str], kind: str | None) -> str | None:
    """The adapter of ``kind`` with the largest column set that ``have`` holds, or None."""
    best, best_size = None, -1
    for name in ADAPTERS:
        meta = ADAPTERS.meta(name)
        if not _kinds_ok(meta["kind"], kind):
            continue
        for needed in meta.get("columns", ()):
            if needed <= have and len(needed) > best_size:
                best, best_size = name, len(needed)
    return best


def _adapter_by_columns(columns: Sequence[str], kind: str | None, label: str) -> str:
    have = set(columns)
    best = _best_by_columns(have, kind)
    if best is None:
        wanted = "; ".join(
            f"{name}: {' + '.join(sorted(cols))}"
            for name in _names(kind)
            for cols in ADAPTERS.meta(name).get("columns", ())
        )
        fix = "Rename the columns, or pass adapter=<name>."
        other = _best_by_columns(have, None) if kind is not None else None
        if other is not None:
            # The columns fit an adapter of the other kind: an SFT set asked for as preferences
            # (or the reverse) is the likely mistake.
            other_kind = ADAPTERS.meta(other)["kind"]
            fix = (
                f"These columns look like {other_kind} data (adapter {other!r}): load it as "
                f"{_as_kind(other_kind)}; or rename the columns, or pass adapter=<name>."
            )
        raise DataError(
            label,
            f"no {kind or 'data'} adapter fits the columns {', '.join(sorted(have)) or '(none)'}; "
            f"adapters select on these columns: {wanted}",
            fix=fix,
        )
    return best


def _as_kind(kind: str) -> str:
    """How to ask for ``kind`` data, in the API and on the command line."""
    loader = "load_sft" if kind == "sft" else "load_preferences"
    return f'{kind} data with kind="{kind}" ({loader}, or --kind {kind} with tvkd data inspect)'


def _check_columns(name: str, columns: Sequence[str], label: str) -> None:
    alternatives = ADAPTERS.meta(name).get("columns", ())
    if alternatives and not any(cols <= set(columns) for cols in alternatives):
        need = " or ".join(" + ".join(sorted(c)) for c in alternatives)
        raise DataError(
            label,
            f"adapter {name!r} needs the columns {need}, but the source has {', '.join(sorted(columns)) or '(none)'}",
            fix="Pick the adapter that matches this data set, or leave adapter= unset to choose by columns.",
        )


def _names(kind: str | None) -> list[str]:
    return [n for n in ADAPTERS if _kinds_ok(ADAPTERS.meta(n)["kind"], kind)]


def _split_candidates(split: str, adapter: str | None) -> list[str]:
    """The requested split, then the source split names it may be called instead."""
    metas = [ADAPTERS.meta(adapter)] if adapter else [ADAPTERS.meta(n) for n in ADAPTERS]
    candidates = [split]
    for meta in metas:
        for alias in meta.get("split_aliases", {}).get(split, ()):
            if alias not in candidates:
                candidates.append(alias)
    return candidates


# --------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class _Source:
    kind: str  # "file" | "folder" | "hub"
    location: str  # the path or the hub id
    name: str  # prefix of default example ids
    hub_id: str | None = None  # the hub data set this is (or mirrors)
    display: str = ""

    @classmethod
    def parse(cls, source: str | Path) -> _Source:
        text = str(source)
        path = Path(text).expanduser()
        if path.is_file():
            return cls("file", str(path), _file_stem(path), None, text)
        if path.is_dir():
            hub_id = _mirrored_hub_id(path)
            return cls("folder", str(path), hub_id or path.resolve().name, hub_id, text)
        looks_local = text.startswith((".", "/", "~")) or text.endswith(JSON_SUFFIXES + PARQUET_SUFFIXES)
        if looks_local or text.count("/") > 1:
            raise DataError(
                text, "no such file or folder", fix="Check the path (hub ids look like 'owner/name')."
            )
        return cls("hub", text, text, text, text)

    def open(self, split: str, adapter: str | None, progress: bool) -> tuple[Any, AdapterContext]:
        """Load the rows of ``split``; return them with the adapter context."""
        meta = ADAPTERS.meta(adapter) if adapter else {}
        if self.kind == "file":
            table = read_file(Path(self.location), self.display)
            return table, AdapterContext(self.display, self.name, split, split, progress)

        data_dir = meta.get("data_dir")
        if self.kind == "folder" and data_dir and not (Path(self.location) / data_dir).is_dir():
            data_dir = None  # the folder is the data directory itself
        where = self.display + (f"/{data_dir}" if data_dir else "")
        kwargs = {"data_dir": data_dir} if data_dir else {}
        if self.kind == "hub":
            if "source_split" in meta:
                source_split = meta["source_split"]  # the adapter selects rows by a split column
            else:
                # A hub repository's split names are not listed before loading; the adapter's
                # first alias is the name that data set uses (HelpSteer2: test -> validation).
                aliases = meta.get("split_aliases", {}).get(split, ())
                source_split = aliases[0] if aliases else split
            label = f"{where} (split {source_split!r})"
            table = load_hub(self.location, source_split, kwargs, self.display, label)
            return table, AdapterContext(label, self.name, source_split, split, progress)

        builder = folder_builder(self.location, kwargs, where)
        if "source_split" in meta:
            source_split = meta["source_split"]
        else:
            source_split = _resolve_folder_split(builder, split, adapter, where)
        label = f"{where} (split {source_split!r})"
        files = folder_files(builder, self.location, self.display)
        table = load_folder(self.location, source_split, kwargs, files, label)
        return table, AdapterContext(label, self.name, source_split, split, progress)


def _file_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(JSON_SUFFIXES + PARQUET_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _mirrored_hub_id(path: Path) -> str | None:
    """The registered hub id a folder's path ends with (``.../argilla/dpo-mix-7k``), or None."""
    parts = path.resolve().parts
    for name in ADAPTERS:
        for hub_id in ADAPTERS.meta(name).get("hub_ids", ()):
            if tuple(parts[-2:]) == tuple(hub_id.split("/")):
                return hub_id
    return None


def _resolve_folder_split(builder: Any, split: str, adapter: str | None, where: str) -> str:
    # Split names are str or datasets.NamedSplit (a folder without a README); compare as str.
    available = [str(name) for name in (builder.config.data_files or {})]
    for candidate in _split_candidates(split, adapter):
        if candidate in available:
            return candidate
    raise DataError(
        where,
        f"has no split {split!r}; its splits are {', '.join(sorted(available)) or '(none)'}",
        fix="Pass one of these as split= (--split on the command line), or adapter=<name> if the folder "
        "holds a known data set that names its splits differently.",
    )
