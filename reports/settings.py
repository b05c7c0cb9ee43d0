"""The settings a table's caption states (α, β, β_V, learning rate, epochs, ...), read from the runs, not written
as fixed text.

`config_columns` gives, per run, the frame's ``config/<section>.<key>`` columns (`reports.store.frame_from_records`
adds them): the loss's values as the run resolved them (``metrics.json``'s ``loss_config``, defaults included), else
as its ``config.yaml`` states them, and the training and cache settings of its ``config.yaml``. A value the run did
not record is left out: a caption then says nothing about it rather than a number the run may not have used.

`describe` and `settings_sentence` write them for a caption: "α 0.7" when every row of the table has the same
value, "α 0.7 (TVKD (ours), TVKD, shuffled Ψ)" when only some rows have one, "β 2 (SimPO), 0.1 (the other
rows)" when the rows differ, and "learning rate 3e-05 (DPO: 2 of 3 runs), 1e-05 (DPO: 1 of 3 runs)" when the
runs of one row disagree. A frame without the column (an older store, a hand-made frame) gives no text.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

__all__ = ["ALPHA", "BETA", "CONFIG", "EPOCHS", "LEARNING_RATE", "SETTINGS", "VALUE_TEMPERATURE", "config_columns",
           "describe", "settings_sentence"]

#: The prefix of the frame's config columns.
CONFIG = "config/"
ALPHA = CONFIG + "loss.alpha"
BETA = CONFIG + "loss.beta"
VALUE_TEMPERATURE = CONFIG + "loss.value_temperature"
LEARNING_RATE = CONFIG + "train.learning_rate"
EPOCHS = CONFIG + "train.num_train_epochs"
#: The loss options the frame holds, and those of them that set the evaluation too (kept for runs that only evaluate).
LOSS_KEYS = ("alpha", "beta", "value_temperature", "gamma", "shaping", "offset_norm")
EVAL_LOSS_KEYS = ("value_temperature", "gamma", "shaping")
TRAIN_KEYS = ("learning_rate", "num_train_epochs")
#: The settings a training table's caption states, in order, with how the caption names them.
SETTINGS: dict[str, str] = {ALPHA: "α", BETA: "β", VALUE_TEMPERATURE: "β_V", LEARNING_RATE: "learning rate",
                            EPOCHS: "epochs"}


def config_columns(config: Mapping[str, Any] | None, loss_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's ``config/<section>.<key>`` columns from its recorded config (``config.yaml``) and its resolved loss
    config (``metrics.json``'s ``loss_config``); a key neither records is absent.

    ``config/loss.value_temperature`` is the soft-value temperature the loss used (β when it ties the two), absent
    when its offsets hold no soft value (another aux reward, offsets from the data). A run
    that only evaluates (``eval_only``) trains nothing: it has no α, β, learning rate or epochs, only the loss
    options that set the evaluation (β_V, γ, shaping). ``config/testbed.<key>``: the testbed settings the run's
    config overrides (e.g. a rebuilt teacher's ``dpo_lr``); ``config/cache.value_temperatures``: the β_V values cached.
    """
    config = config if isinstance(config, Mapping) else {}
    resolved = dict(loss_config) if isinstance(loss_config, Mapping) else {}
    loss = config.get("loss") if isinstance(config.get("loss"), Mapping) else {}
    options = loss.get("options") if isinstance(loss.get("options"), Mapping) else {}
    stated = {**options, **resolved}
    eval_only = bool(config.get("eval_only"))
    out: dict[str, Any] = {}
    if loss.get("name"):
        out[CONFIG + "loss.name"] = str(loss["name"])
    if stated.get("tie_temperature") is True and "beta" in stated:
        stated["value_temperature"] = stated["beta"]
    if (stated.get("aux") not in (None, "soft_value")
            or str(stated.get("offset_source") or "teacher") != "teacher"):
        stated.pop("value_temperature", None)  # no soft value in its offsets: β_V plays no part
    for key in EVAL_LOSS_KEYS if eval_only else LOSS_KEYS:
        if stated.get(key) is not None:
            out[CONFIG + f"loss.{key}"] = stated[key]
    train = config.get("train") if isinstance(config.get("train"), Mapping) else {}
    for key in () if eval_only else TRAIN_KEYS:
        if train.get(key) is not None:
            out[CONFIG + f"train.{key}"] = train[key]
    cache = config.get("cache") if isinstance(config.get("cache"), Mapping) else {}
    if cache.get("value_temperatures"):
        out[CONFIG + "cache.value_temperatures"] = tuple(cache["value_temperatures"])
    testbed = config.get("testbed") if isinstance(config.get("testbed"), Mapping) else {}
    for key, value in testbed.items():
        if isinstance(value, (numbers.Real, str)):
            out[CONFIG + f"testbed.{key}"] = value
    return out


def _missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def _text(value: object) -> str:
    """A setting as a caption writes it: 0.7, 2, 3e-05, "pbrs"; a list "2, 5"."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Real):
        return f"{float(value):g}"
    return str(value)


def describe(df: pd.DataFrame, column: str, rows: Sequence[object] | pd.Series, symbol: str | None = None,
             *, unit: str = "") -> str | None:
    """The setting ``column`` of the table's runs as a caption states it (``symbol`` before the value), or None
    when no run of the table has it.

    ``rows``: per run of ``df`` (same order), the name of the table row it is shown in, or None for a run the
    table does not show. The value alone when every row with runs has it; "…, none for <rows>" when most rows
    have it and the others have none; the rows named after it when only some have one or the rows differ; "k of n
    runs" beside a row whose runs disagree.
    """
    if column not in df.columns:
        return None
    names = [None if _missing(r) else str(r) for r in rows]
    if len(names) != len(df):
        raise ValueError(f"describe: {len(names)} row names for {len(df)} runs")
    symbol = symbol if symbol is not None else SETTINGS.get(column, column.removeprefix(CONFIG))
    runs: dict[str, int] = {}
    by_row: dict[str, dict[str, int]] = {}  # row -> {value text: runs}
    for name, value in zip(names, df[column]):
        if name is None:
            continue
        runs[name] = runs.get(name, 0) + 1
        if not isinstance(value, (list, tuple)) and _missing(value):
            continue
        counts = by_row.setdefault(name, {})
        counts[_text(value)] = counts.get(_text(value), 0) + 1
    if not by_row:
        return None
    values = list(dict.fromkeys(v for counts in by_row.values() for v in counts))
    complete = all(sum(by_row.get(name, {}).values()) == n for name, n in runs.items())  # every shown run has one

    def rows_of(value: str) -> list[str]:
        return [name + (f": {counts[value]} of {runs[name]} runs" if len(counts) > 1 or counts[value] < runs[name]
                        else "") for name, counts in by_row.items() if value in counts]

    suffix = f" {unit}" if unit else ""
    if len(values) == 1 and complete:
        return f"{symbol} {values[0]}{suffix}"
    if len(values) == 1:
        without = [name for name in runs if name not in by_row]
        whole = all(sum(by_row[name].values()) == runs[name] for name in by_row)  # a row has it in all its runs
        if whole and len(by_row) > len(without):
            listed = ", ".join(without[:-1]) + " and " + without[-1] if len(without) > 1 else without[0]
            return f"{symbol} {values[0]}{suffix}, none for {listed}"  # no parentheses: row names carry their own
        return f"{symbol} {values[0]}{suffix} ({', '.join(rows_of(values[0]))})"
    parts = [(v, rows_of(v)) for v in values]
    most = max(parts, key=lambda p: len(p[1]))
    uniform = complete and all(len(c) == 1 for c in by_row.values())
    if uniform and len(most[1]) > 1:  # the commonest value last, for "the other rows"
        parts = [p for p in parts if p is not most] + [(most[0], ["the other rows"])]
    return f"{symbol} " + ", ".join(f"{v}{suffix} ({', '.join(names)})" for v, names in parts)


def settings_sentence(df: pd.DataFrame, rows: Sequence[object] | pd.Series,
                      settings: Mapping[str, str] | Iterable[str] = SETTINGS) -> str:
    """"Settings from the runs' configs: α 0.7 (TVKD (ours)); β 0.1; ..." for the ``settings`` (column -> symbol,
    or columns named as in `SETTINGS`) the table's runs have, or "" when they have none of them."""
    named = dict(settings) if isinstance(settings, Mapping) else {c: SETTINGS.get(c, c) for c in settings}
    parts = [text for column, symbol in named.items() if (text := describe(df, column, rows, symbol))]
    return f"Settings from the runs' configs: {'; '.join(parts)}." if parts else ""
