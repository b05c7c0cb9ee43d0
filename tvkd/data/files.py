"""Reading data files, folders and hub data sets with every bad input answered by a DataError.

``datasets`` reports a broken JSON Lines file as "An error occurred while generating the
dataset", a truncated Parquet file as an Arrow error and a data set missing from the offline
cache as a ``ConnectionError``: none of them names the file, the line or the fix. The helpers
here check what is cheap to check before loading (Parquet footers, the shape of a ``.json``
document) and, when loading fails anyway, re-read the input to say which file and line is wrong
and how to fix it.

Line numbers are 1-based lines of the (uncompressed) text; a ``.json`` file's list items are
named by their 0-based row number, as the rows of the loaded split are.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets

from tvkd.data.errors import DataError, describe

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
_LINE_FIX = "Fix the line or drop it."
_JSON_SHAPE_FIX = (
    "Make the top level a list of row objects ([{...}, {...}]), or write one JSON object per line "
    "in a .jsonl file."
)
_PARQUET_FIX = "The file is truncated, corrupt or not Parquet: download or export it again."


# --------------------------------------------------------------------------------------------
# One local file


def read_file(path: Path, display: str) -> Any:
    """Load one ``.jsonl`` / ``.json`` / ``.parquet`` file (optionally ``.gz``) as one split."""
    name = path.name
    if name.endswith(PARQUET_SUFFIXES):
        check_parquet(path, display)
        table = load_or_explain(
            lambda: datasets.load_dataset("parquet", data_files=str(path), split="train"),
            [(path, display)],
            display,
        )
    elif name.endswith(JSON_SUFFIXES):
        if path.stat().st_size == 0:
            raise DataError(display, "the file is empty", fix="Point to a file with rows.")
        if name.endswith((".json", ".json.gz")):
            check_json_document(_read_bytes(path, display), display)
        table = load_or_explain(
            lambda: datasets.load_dataset("json", data_files=str(path), split="train"),
            [(path, display)],
            display,
        )
    else:
        raise DataError(
            display,
            f"unsupported file type {''.join(path.suffixes) or '(none)'}",
            fix="Use a .jsonl, .json or .parquet file (optionally .gz), or a folder laid out like a hub data set.",
        )
    if len(table) == 0:
        raise DataError(display, "the file has no rows", fix="Point to a file with rows.")
    return table


def load_or_explain(load: Callable[[], Any], files: Iterable[tuple[Path, str]], where: str) -> Any:
    """``load()``; if it fails, find the file and line at fault and raise a DataError naming them.

    ``files`` are the data files behind the load with the names to show for them. A failure no
    file check explains is raised as a DataError quoting datasets' reason when it is about the
    data (Arrow could not build a table), and re-raised unchanged otherwise. The loaded table is
    validated in full, since Arrow's JSON reader lets bytes that are not UTF-8 into string
    columns, where they would fail only when the row is read.
    """
    files = list(files)
    try:
        with _quiet_reader_errors():
            table = load()
    except DataError:
        raise
    except Exception as e:
        for path, display in files:
            diagnose(path, display)
        about_data = isinstance(
            e, (datasets.exceptions.DatasetGenerationError, UnicodeError)
        ) or _arrow_error(e)
        if about_data and not isinstance(_innermost(e), OSError):  # OSError: the disk or cache, not the data
            raise DataError(
                where,
                f"could not be read into a table ({_reason(e)})",
                fix="Give every row the same fields with the same types (e.g. 'chosen' always a string, "
                "or always a list of messages).",
            ) from e
        raise
    arrow = getattr(getattr(table, "data", None), "table", None)
    if arrow is not None:
        try:
            arrow.validate(full=True)
        except Exception as e:
            for path, display in files:
                diagnose(path, display)
            raise DataError(
                where,
                f"holds invalid data ({_reason(e)})",
                fix="The files must be UTF-8: re-save them as UTF-8.",
            ) from e
    return table


# The readers log "Failed to load JSON from file ..." before raising; the DataError raised here
# says it better, and the rule is one line per mistake.
_READER_LOGGERS = ("datasets.packaged_modules.json.json", "datasets.packaged_modules.parquet.parquet")


def _drop_errors(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextmanager
def _quiet_reader_errors() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _READER_LOGGERS]
    for logger in loggers:
        logger.addFilter(_drop_errors)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_drop_errors)


def diagnose(path: Path, display: str) -> None:
    """Raise a DataError for the first problem found in one data file (other types: ignored)."""
    name = path.name
    if name.endswith(PARQUET_SUFFIXES):
        check_parquet(path, display)
        import pyarrow.parquet as pq

        try:
            pq.read_table(path)
        except Exception as e:
            raise DataError(
                display, f"not a readable Parquet file ({_reason(e)})", fix=_PARQUET_FIX
            ) from None
    elif name.endswith(JSON_SUFFIXES):
        data = _read_bytes(path, display)
        if name.endswith((".json", ".json.gz")) and check_json_document(data, display) == "document":
            return
        check_json_lines(data, display)


# --------------------------------------------------------------------------------------------
# Checks


def check_parquet(path: Path, display: str) -> None:
    """A Parquet file must end in a readable footer (a truncated download does not)."""
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception as e:
        raise DataError(display, f"not a readable Parquet file ({_reason(e)})", fix=_PARQUET_FIX) from None


def check_json_lines(data: bytes, display: str) -> None:
    """JSON Lines: UTF-8, one JSON object per non-blank line, at least one row."""
    rows = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                display,
                f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)",
                line=number,
                fix="The file must be UTF-8: re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or fix the line.",
            ) from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                display, f"not valid JSON ({e.msg}, column {e.colno})", line=number, fix=_LINE_FIX
            ) from None
        if not isinstance(value, dict):
            raise DataError(
                display,
                f"each line must be a JSON object, got {type(value).__name__}",
                line=number,
                fix=_LINE_FIX,
            )
        rows += 1
    if rows == 0:
        raise DataError(
            display,
            "the file has no rows (it holds only blank lines)",
            fix="Point to a file with one JSON object per line.",
        )


def check_json_document(data: bytes, display: str) -> str:
    """A ``.json`` file: a list of row objects, a dict of equal-length columns, or JSON Lines.

    Returns ``"document"`` for a checked single JSON document and ``"lines"`` when the file is
    JSON Lines (several top-level values), which :func:`check_json_lines` checks.
    """
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            display,
            f"not valid UTF-8 (byte 0x{data[e.start]:02x} at byte {column} of the line)",
            line=line,
            fix="The file must be UTF-8: re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or fix the line.",
        ) from None
    if not text.strip():
        raise DataError(
            display, "the file has no rows (it holds only blank lines)", fix="Point to a file with rows."
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" or _first_line_is_object(text):
            return "lines"
        raise DataError(
            display, f"not valid JSON ({e.msg}, column {e.colno})", line=e.lineno, fix="Fix the JSON syntax."
        ) from None
    if isinstance(value, list):
        if not value:
            raise DataError(
                display,
                "the file has no rows (the top-level list is empty)",
                fix="Point to a file with rows.",
            )
        for number, item in enumerate(value):
            if not isinstance(item, dict):
                raise DataError(
                    display,
                    f"the top-level list must hold row objects, but item {number} is {describe(item)}",
                    row=number,
                    fix=_JSON_SHAPE_FIX,
                )
        return "document"
    if isinstance(value, dict):
        for key, inner in value.items():
            if _is_list_of_rows(inner):
                raise DataError(
                    display,
                    f"the top level is one JSON object whose {key!r} holds a list of {len(inner)} objects; "
                    "the rows must be the top level",
                    fix=f"Make the top level the list under {key!r} ([{{...}}, {{...}}]), or write one row "
                    "object per line in a .jsonl file.",
                )
        columns = [v for v in value.values() if isinstance(v, list)]
        if value and len(columns) == len(value) and len({len(c) for c in columns}) == 1:
            return "document"  # a dict of columns, which datasets reads too
        if "\n" not in text.strip():
            return "lines"  # one object on one line: a JSON Lines file with one row
        raise DataError(
            display,
            f"the top level is one JSON object spread over {text.strip().count(chr(10)) + 1} lines, not a list of rows",
            fix=_JSON_SHAPE_FIX,
        )
    raise DataError(
        display, f"the top level is {describe(value)}, not a list of row objects", fix=_JSON_SHAPE_FIX
    )


def _first_line_is_object(text: str) -> bool:
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _is_list_of_rows(value: Any) -> bool:
    """A non-empty list of objects that are not chat messages (those carry a 'role')."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(x, dict) for x in value)
        and not all("role" in x for x in value)
    )


def _read_bytes(path: Path, display: str) -> bytes:
    if not path.name.endswith(".gz"):
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            display,
            f"not a readable gzip file ({_reason(e)})",
            fix="The file is truncated or not gzip: download or compress it again, or drop the .gz suffix if it is plain text.",
        ) from None


def _arrow_error(e: BaseException) -> bool:
    import pyarrow as pa

    return isinstance(e, pa.ArrowException)


def _innermost(e: BaseException) -> BaseException:
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return e


def _reason(e: BaseException) -> str:
    """The innermost cause of ``e`` as ``Type: first line of message`` (at most 200 chars)."""
    e = _innermost(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 200 else text[:199] + "…"


# --------------------------------------------------------------------------------------------
# A folder laid out like a hub data set


MAX_FOLDER_FILES = 20_000  # a data set folder with more files than this is almost surely not one


def _check_folder_size(folder: str, where: str, limit: int | None = None) -> None:
    """Refuse at once a folder too large to be a data set (a home folder, /tmp): `datasets` would walk all of it
    for data files before answering, which takes minutes on a big tree. Stops counting at `limit`."""
    limit = limit or MAX_FOLDER_FILES
    count, stack = 0, [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        count += 1
                        if count > limit:
                            raise DataError(
                                where, f"holds more than {limit:,} files, too many for a data set folder",
                                fix="Point source at the data set's own folder (its data files, named by split, "
                                    "or a data/ folder) or at one file.")
        except OSError:
            continue  # an unreadable subfolder: `datasets` says what it cannot read


def folder_builder(folder: str, kwargs: dict[str, Any], where: str) -> Any:
    """``datasets.load_dataset_builder`` for a local folder, its failures as DataErrors."""
    _check_folder_size(folder, where)
    try:
        return datasets.load_dataset_builder(folder, **kwargs)
    except (
        datasets.exceptions.DataFilesNotFoundError,
        datasets.data_files.EmptyDatasetError,
        FileNotFoundError,
    ):
        raise DataError(
            where,
            "holds no data files",
            fix="Put .jsonl, .json or .parquet files in it, named by split (train.jsonl, "
            "data/test-00000-of-00001.parquet), or point source at one file.",
        ) from None


def folder_files(builder: Any, folder: str, display: str) -> list[tuple[Path, str]]:
    """Every data file of every split of a folder, with its path shown under ``display``."""
    root = Path(folder).resolve()
    out = []
    for files in (builder.config.data_files or {}).values():
        for file in files:
            path = Path(str(file))
            try:
                shown = str(Path(display) / path.resolve().relative_to(root))
            except ValueError:
                shown = str(path)
            out.append((path, shown))
    return out


def load_folder(
    folder: str, split: str, kwargs: dict[str, Any], files: list[tuple[Path, str]], where: str
) -> Any:
    """Load one split of a folder; a bad file is named with its line. (datasets prepares every
    split of a folder at once, so any split's bad file stops the load.)"""
    for path, shown in files:
        if path.name.endswith(PARQUET_SUFFIXES):
            check_parquet(path, shown)
    return load_or_explain(lambda: datasets.load_dataset(folder, split=split, **kwargs), files, where)


# --------------------------------------------------------------------------------------------
# A hub data set


def load_hub(hub_id: str, split: str, kwargs: dict[str, Any], display: str, where: str) -> Any:
    """``datasets.load_dataset(hub_id)``, with offline / unknown id / unknown split as DataErrors."""
    try:
        return datasets.load_dataset(hub_id, split=split, **kwargs)
    except ConnectionError as e:
        copy = (
            f"run `huggingface-cli download --repo-type dataset {hub_id} --local-dir {hub_id}` on a machine "
            "with network access (`hf download` in huggingface_hub >= 1.0), copy that folder here and pass its "
            "path as source; or point source at a local folder or file in the same schema."
        )
        if _offline():
            raise DataError(
                display,
                "this data set is not in the local Hugging Face cache and this machine is offline "
                "(HF_HUB_OFFLINE=1), so it cannot be downloaded",
                fix=f"To use it, {copy}",
            ) from None
        raise DataError(
            display,
            f"could not reach the Hugging Face Hub ({_reason(e)})",
            fix=f"Check the network connection; or {copy}",
        ) from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(
            display,
            f"no such data set on the Hugging Face Hub, or it is private or gated ({_reason(e)})",
            fix="Check the id (it looks like 'owner/name'); for a gated or private data set log in with "
            "`huggingface-cli login`; or point source at a local folder or file.",
        ) from None
    except ValueError as e:
        if not str(e).startswith("Unknown split"):
            raise
        raise DataError(
            where,
            f"has no split {split!r} ({str(e).strip()})",
            fix="Pass one of its splits as split= (--split on the command line).",
        ) from None


def _offline() -> bool:
    import huggingface_hub.constants

    return bool(datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)
