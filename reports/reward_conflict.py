"""The reward-conflict table (the paper's Table 5): TVKD with each auxiliary reward, against DPO,
a positive control (a perfect teacher) and the shuffled negative control.

Input: one row per finished run with the columns

    method                  "tvkd" or "dpo"
    aux                     the aux reward of a TVKD run (None for DPO)
    control                 "none" | "shuffled" | "ceiling" (missing/None reads as "none"; "ceiling": a DPO run
                            on the oracle-relabelled pairs, `testbed:student_pref_train_oracle`)
    offset_source           where a TVKD run's offsets come from: "teacher" (missing/None reads as that)
                            or "data:…" (e.g. "data:oracle_chosen,oracle_rejected": the oracle's score gaps)
    seed
    margin_accuracy         fraction in [0, 1] (docs/methods.md §A.6: the student's implicit-reward accuracy)
    oracle_score            mean oracle reward r*(x, y) of the student's generations
    win_rate_vs_soft_value  fraction of prompts the run's generations beat TVKD(soft_value)'s
    items.oracle_score      optional: {prompt: oracle score} behind oracle_score (for the Δ columns)
    items.margin_accuracy   optional: per-test-pair outcomes behind margin_accuracy, same order in every run

Other columns are ignored. Rows: the six aux rewards of docs/methods.md §A.2 in the paper's order, then
"oracle gap (positive control)" (a TVKD run whose offsets are the oracle's own score gaps, whatever
its aux: what a perfect teacher would give), "DPO on oracle labels (ceiling)" (DPO on the same pairs
with every label set by the oracle: what noise-free preferences give, so the room any teacher has is
the gap between DPO and this row), "DPO" (no teacher) and "soft_value (shuffled Ψ)" (the
teacher offsets permuted across pairs; a gain it also shows is not teacher knowledge). The teacher
rows match only runs with teacher offsets. Each cell is mean ± std over seeds; a row without finished
runs stays in the table with "–". Only the aux rewards and DPO are ranked for the bold/second marks:
the controls are diagnostics, not methods, and in the win-rate column the soft_value row is the
opponent itself. Two more columns give each row's paired difference to DPO (or another ``reference``
row) in oracle score and margin accuracy with a 95% crossed seed × item interval, and the caption
the smallest difference the table can detect (reports/effects.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from reports.effects import (
    EFFECT_METRICS,
    detection_limit_sentence,
    effect_cells,
    effect_header,
    effects_by_row,
    effects_caption,
    items_column,
)
from reports.settings import settings_sentence
from reports.tables import TABLES, MetricSpec, format_table, seeds_of, summarize, write_table_files

__all__ = ["METRICS", "ROWS", "TableRow", "format_reward_conflict", "reward_conflict_summary",
           "write_reward_conflict_tables"]

STUDY = "reward-conflict"
#: The default reference row of the Δ columns.
EFFECT_REFERENCE = "dpo"
METRICS: dict[str, MetricSpec] = {
    "margin_accuracy": MetricSpec("Margin accuracy (%)", higher_is_better=True, digits=1, percent=True),
    "oracle_score": MetricSpec("Oracle score", higher_is_better=True, digits=3),
    "win_rate_vs_soft_value": MetricSpec("Win rate vs soft_value (%)", higher_is_better=True, digits=1, percent=True),
}
#: The metrics with a Δ column (per-item results in the frame), in table order.
_EFFECTS = tuple(m for m in METRICS if m in EFFECT_METRICS)
REQUIRED_COLUMNS = ("method", "seed")


@dataclass(frozen=True)
class TableRow:
    """One row of the table and the runs it selects (method, aux, control, offset source).

    ``offset_source``: "teacher" selects runs with teacher offsets (or none recorded); another value
    is a prefix ("data:") that selects runs whose offsets come from the data, whatever their aux.
    """

    key: str
    type: str  # "action" | "state" | "–" | "control" | "control+"
    name: str
    formula_tex: str | None  # LaTeX math, or None for "–"
    formula_text: str | None  # the same, readable as plain text
    method: str
    aux: str | None
    control: str
    ranked: bool = True
    offset_source: str = "teacher"


_SOFT_VALUE_TEX = r"$\beta_V \log \sum_a \exp(z(a)/\beta_V)$"
_SOFT_VALUE_TEXT = "β_V log Σ_a exp(z(a)/β_V)"

#: The rows in table order; formulas are the teacher quantities of docs/methods.md §A.2, π = softmax(z).
ROWS: tuple[TableRow, ...] = (
    TableRow("logits", "action", "logits", r"$z(a)$", "z(a)", "tvkd", "logits", "none"),
    TableRow("log_prob", "action", "log_prob", r"$\log \pi(a)$", "log π(a)", "tvkd", "log_prob", "none"),
    TableRow("max", "state", "max", r"$\max_a \pi(a)$", "max_a π(a)", "tvkd", "max", "none"),
    TableRow("margin", "state", "margin", r"$\pi(1) - \pi(2)$", "π(1) − π(2)", "tvkd", "margin", "none"),
    TableRow("expectation", "state", "expectation", r"$\sum_a \pi(a)\, z(a)$", "Σ_a π(a) z(a)",
             "tvkd", "expectation", "none"),
    TableRow("soft_value", "state", "soft_value", _SOFT_VALUE_TEX, _SOFT_VALUE_TEXT, "tvkd", "soft_value", "none"),
    TableRow("oracle_gap", "control+", "oracle gap (positive control)", r"$r^*(x, y_w) - r^*(x, y_l)$",
             "r*(x, y_w) − r*(x, y_l)", "tvkd", None, "none", ranked=False, offset_source="data:"),
    TableRow("ceiling", "control+", "DPO on oracle labels (ceiling)", None, None, "dpo", None, "ceiling",
             ranked=False),
    TableRow("dpo", "–", "DPO", None, None, "dpo", None, "none"),
    TableRow("soft_value_shuffled", "control", "soft_value (shuffled Ψ)", _SOFT_VALUE_TEX, _SOFT_VALUE_TEXT,
             "tvkd", "soft_value", "shuffled", ranked=False),
)


def _normalized(value: object, default: str | None) -> str | None:
    """Lower-case text, with None/NaN/""/"none" meaning ``default``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    text = str(value).strip().lower()
    return default if text in ("", "none", "null", "nan") else text


def _column(df: pd.DataFrame, name: str, default: str | None) -> list[str | None]:
    return [_normalized(v, default) for v in df[name]] if name in df.columns else [default] * len(df)


def _selects(row: TableRow, method: str | None, aux: str | None, control: str | None, source: str) -> bool:
    if method != row.method or control != row.control:
        return False
    if row.offset_source != "teacher":  # offsets from the data: the aux reward plays no part
        return source.startswith(row.offset_source)
    # DPO has no teacher, so its aux (if any was recorded) does not select anything.
    return source == "teacher" and (row.method == "dpo" or aux == row.aux)


def _assign_rows(df: pd.DataFrame) -> pd.Series:
    """The table row key of each run (None for runs that belong to no row)."""
    runs = zip(_column(df, "method", None), _column(df, "aux", None), _column(df, "control", "none"),
               _column(df, "offset_source", "teacher"))
    keys = [next((row.key for row in ROWS if _selects(row, *run)), None) for run in runs]
    return pd.Series(keys, index=df.index, dtype="object")


def _check_reference(reference: str) -> str:
    keys = [r.key for r in ROWS]
    if reference not in keys:
        raise ValueError(f"reward_conflict: reference {reference!r} is no table row; rows: {', '.join(keys)}")
    return reference


def reward_conflict_summary(df: pd.DataFrame, reference: str = EFFECT_REFERENCE) -> pd.DataFrame:
    """One summary row per `ROWS` entry, in table order: key, Type, Name, formulas, ranked, n,
    ``<metric>.mean/.std/.n``, and ``effect.<metric>`` (oracle score, margin accuracy): the row's
    `reports.effects.Effect` against the ``reference`` row (a row key; DPO by default), or None.
    Rows without runs get n = 0 and NaN metrics.

    Raises KeyError for missing ``method``/``seed`` columns and ValueError when a row holds two
    runs of one seed (the frame mixes configurations: filter it to one per seed first). Runs
    that match no row, and absent metric or per-item columns, are reported with a warning.
    """
    absent = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if absent:
        raise KeyError(f"reward_conflict: columns {absent} are missing; the frame has {list(df.columns)}")
    _check_reference(reference)
    df = df.copy()
    for metric in METRICS:
        if metric not in df.columns:
            warnings.warn(f"reward_conflict: no {metric!r} column; that column of the table shows –", stacklevel=2)
            df[metric] = math.nan
    for metric in _EFFECTS:
        if items_column(metric) not in df.columns:
            warnings.warn(f"reward_conflict: no {items_column(metric)!r} column (per-item results); the "
                          f"Δ {EFFECT_METRICS[metric][0]} column shows –", stacklevel=2)
    df["_row"] = _assign_rows(df)
    stray = df[df["_row"].isna()]
    if len(stray):
        kinds = sorted({f"method={m!r} aux={a!r} control={c!r}" + (f" offset_source={o!r}" if o != "teacher" else "")
                        for m, a, c, o in zip(stray["method"], stray.get("aux", [None] * len(stray)),
                                              stray.get("control", ["none"] * len(stray)),
                                              _column(stray, "offset_source", "teacher"))})
        warnings.warn(f"reward_conflict: {len(stray)} runs match no table row and are not shown: {'; '.join(kinds)}",
                      stacklevel=2)
    df = df[df["_row"].notna()]
    duplicated = df[df.duplicated(["_row", "seed"], keep=False)]
    if len(duplicated):
        where = sorted({(k, s) for k, s in zip(duplicated["_row"], duplicated["seed"])}, key=str)
        raise ValueError(f"reward_conflict: several runs for one (row, seed): {where}; "
                         f"filter the frame to one configuration per seed")
    summary = summarize(df, by=["_row"], metrics=list(METRICS))
    spec = pd.DataFrame(
        [{"key": r.key, "Type": r.type, "Name": r.name, "formula_tex": r.formula_tex,
          "formula_text": r.formula_text, "ranked": r.ranked} for r in ROWS]
    )
    out = spec.merge(summary.rename(columns={"_row": "key"}), on="key", how="left")
    count_cols = ["n"] + [f"{m}.n" for m in METRICS]
    out[count_cols] = out[count_cols].fillna(0).astype(int)
    effects = effects_by_row(df, "_row", out["key"].tolist(), reference, _EFFECTS, table="reward_conflict")
    for metric, row_effects in effects.items():
        out[f"effect.{metric}"] = pd.Series(row_effects, index=out.index, dtype="object")
    return out


def _caption(df: pd.DataFrame, fmt: str, summary: pd.DataFrame, reference_name: str) -> str:
    rows = _assign_rows(df)
    seeds = seeds_of(df.loc[rows.notna(), "seed"])
    second = "underlined" if fmt == "latex" else "italic"
    caption = (
        "Reward conflict (the paper's Table 5): TVKD with each auxiliary reward, the positive control (TVKD "
        "with the oracle's own score gaps as offsets: a perfect teacher), the ceiling control (DPO on the same "
        "pairs relabelled by the oracle: noise-free preferences), DPO, and the shuffled "
        f"control. Mean ± std over seeds {', '.join(map(str, seeds)) or '(none)'}; n = runs per row "
        "(std 0 when n = 1). Margin accuracy and win rate in %. "
        f"Bold: best, {second}: second best among the aux rewards and DPO (not ranked: the controls, and "
        "soft_value in its own win-rate column); "
        "– : no finished run. " + effects_caption(reference_name)
    )
    names = {r.key: r.name for r in ROWS}
    settings = settings_sentence(df, [names.get(k) for k in rows])
    limit = detection_limit_sentence({m: summary[f"effect.{m}"].tolist() for m in _EFFECTS},
                                     {m: METRICS[m] for m in _EFFECTS})
    return caption + "".join(f" {text}" for text in (settings, limit) if text)


def _ranked(summary: pd.DataFrame) -> dict[str, list[bool]]:
    """Rows competing for the marks, per metric: the control never; in the win-rate column not
    the soft_value row either, since it is the opponent every win rate is measured against."""
    ranked = summary["ranked"].tolist()
    opponent = [k != "soft_value" for k in summary["key"]]
    return {m: [r and o for r, o in zip(ranked, opponent)] if m == "win_rate_vs_soft_value" else ranked
            for m in METRICS}


def format_reward_conflict(df: pd.DataFrame, fmt: str = "markdown", reference: str = EFFECT_REFERENCE) -> str:
    """The table as Markdown or LaTeX text (with its caption), from per-run rows; the Δ columns are
    against the ``reference`` row (a row key: DPO by default)."""
    summary = reward_conflict_summary(df, reference)
    latex = fmt == "latex"
    summary["Formula"] = summary["formula_tex" if latex else "formula_text"]
    reference_name = next(r.name for r in ROWS if r.key == reference)
    extra = {}
    for metric in _EFFECTS:
        column = f"Δ.{metric}"
        summary[column] = effect_cells(summary[f"effect.{metric}"].tolist(), METRICS[metric], summary["n"].tolist())
        extra[column] = effect_header(metric, reference_name, METRICS[metric])
    # rules above the positive control, DPO and the shuffled control: the groups of the table
    rules = {i for i, r in enumerate(ROWS) if r.key in ("oracle_gap", "dpo", "soft_value_shuffled")}
    return format_table(
        summary,
        metrics=METRICS,
        row_label_cols=["Type", "Name", "Formula"],
        fmt=fmt,
        ranked=_ranked(summary),
        latex_cols={"Formula"},
        caption=_caption(df, fmt, summary, reference_name),
        label="tab:reward_conflict" if latex else None,
        rules_before=rules,
        extra_cols=extra,
    )


@TABLES.register(
    "reward_conflict", study=STUDY, paper="Table 5", outputs=("reward_conflict.md", "reward_conflict.tex"),
    columns=("method", "aux", "control", "offset_source", "seed", *METRICS, *map(items_column, _EFFECTS)),
)
def write_reward_conflict_tables(df: pd.DataFrame, out_dir: str | Path,
                                 reference: str = EFFECT_REFERENCE) -> dict[str, Path]:
    """Write ``reward_conflict.md`` and ``reward_conflict.tex`` into ``out_dir`` (atomically);
    returns ``{"md": path, "tex": path}``. ``reference``: the row the Δ columns compare against."""
    paths = write_table_files(out_dir, "reward_conflict", "reports/reward_conflict.py",
                              lambda fmt: format_reward_conflict(df, fmt, reference))
    return paths
