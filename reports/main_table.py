"""The main table (the paper's Table 1): the two teachers and the student trained by every method.

Input: one row per finished run (the `main-table` study's frame) with the columns

    label              the study variant: teacher_dpo, teacher_sft, sft, dpo, simpo, wpo, tdpo, vanilla_kd,
                       seqkd, ddpo, dpkd, gkd, dckd, adpa, tvkd_released, tvkd
    seed
    oracle_score       mean oracle reward r*(x, y) of the run's greedy generations on the test prompts
    win_rate_vs_adpa   fraction of test prompts on which the run's generation beats ADPA's (same seed; ties 1/2)
    margin_accuracy    fraction in [0, 1] (docs/methods.md §A.6: the student's implicit-reward accuracy)
    items.oracle_score      optional: {prompt: oracle score} behind oracle_score (for the Δ columns)
    items.margin_accuracy   optional: per-test-pair outcomes behind margin_accuracy, same order in every run

Other columns (``method`` among them) are ignored: rows are selected by ``label``. Rows follow the
paper's Table 1: "DPO Teacher" and "SFT Teacher" (evaluated as they are), then SFT, DPO, SimPO, WPO,
TDPO (the paper's "TDPO [17]" is TIS-DPO, docs/methods.md §A.5), VanillaKD, SeqKD, DDPO, DPKD, GKD,
DCKD, ADPA, TVKD (released) and TVKD (ours). Each cell is mean ± std over seeds; a row without
finished runs stays in the table with "–". Only the student methods are ranked for the bold /
underlined marks: the teachers are references, not methods, and in the win-rate column the ADPA
row is the opponent itself. Two more columns give each row's paired difference to DPO (or another
``reference`` row) in oracle score and margin accuracy with a 95% crossed seed × item interval,
and the caption the smallest difference the table can detect (reports/effects.py).
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

__all__ = ["METRICS", "ROWS", "TableRow", "format_main_table", "main_table_summary", "write_main_table_tables"]

STUDY = "main-table"
REFERENCE = "adpa"
METRICS: dict[str, MetricSpec] = {
    "oracle_score": MetricSpec("Oracle score", higher_is_better=True, digits=3),
    f"win_rate_vs_{REFERENCE}": MetricSpec("Win rate vs ADPA (%)", higher_is_better=True, digits=1, percent=True),
    "margin_accuracy": MetricSpec("Margin accuracy (%)", higher_is_better=True, digits=1, percent=True),
}
#: The metrics with a Δ column (per-item results in the frame), in table order.
_EFFECTS = tuple(m for m in METRICS if m in EFFECT_METRICS)
#: The default reference row (label) of the Δ columns; the win rates are against `REFERENCE`.
EFFECT_REFERENCE = "dpo"
REQUIRED_COLUMNS = ("label", "seed")


@dataclass(frozen=True)
class TableRow:
    """One row of the table: the study variant it shows (``label``) and its name in the paper."""

    label: str
    name: str
    ranked: bool = True


#: The rows in the paper's order (its Table 1); teachers first, shown but not ranked.
ROWS: tuple[TableRow, ...] = (
    TableRow("teacher_dpo", "DPO Teacher", ranked=False),
    TableRow("teacher_sft", "SFT Teacher", ranked=False),
    TableRow("sft", "SFT"),
    TableRow("dpo", "DPO"),
    TableRow("simpo", "SimPO"),
    TableRow("wpo", "WPO"),
    TableRow("tdpo", "TDPO"),
    TableRow("vanilla_kd", "VanillaKD"),
    TableRow("seqkd", "SeqKD"),
    TableRow("ddpo", "DDPO"),
    TableRow("dpkd", "DPKD"),
    TableRow("gkd", "GKD"),
    TableRow("dckd", "DCKD"),
    TableRow("adpa", "ADPA"),
    TableRow("tvkd_released", "TVKD (released)"),
    TableRow("tvkd", "TVKD (ours)"),
)
_LABELS = {r.label for r in ROWS}


def _label(value: object) -> str | None:
    """The row a run's label selects (stripped, lower-case), or None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    return text if text in _LABELS else None


def _check_reference(reference: str) -> str:
    if reference not in _LABELS:
        raise ValueError(f"main_table: reference {reference!r} is no table row; rows: "
                         f"{', '.join(r.label for r in ROWS)}")
    return reference


def main_table_summary(df: pd.DataFrame, reference: str = EFFECT_REFERENCE) -> pd.DataFrame:
    """One summary row per `ROWS` entry, in table order: label, Method, ranked, n,
    ``<metric>.mean/.std/.n``, and ``effect.<metric>`` (oracle score, margin accuracy): the row's
    `reports.effects.Effect` against the ``reference`` row (a label; DPO by default), or None.
    Rows without runs get n = 0 and NaN metrics.

    Raises KeyError for missing ``label``/``seed`` columns and ValueError when a row holds two
    runs of one seed (the frame mixes configurations: filter it to one per seed first). Runs
    whose label is no table row, and absent metric or per-item columns, are reported with a warning.
    """
    absent = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if absent:
        raise KeyError(f"main_table: columns {absent} are missing; the frame has {list(df.columns)}")
    _check_reference(reference)
    df = df.copy()
    for metric in METRICS:
        if metric not in df.columns:
            warnings.warn(f"main_table: no {metric!r} column; that column of the table shows –", stacklevel=2)
            df[metric] = math.nan
    for metric in _EFFECTS:
        if items_column(metric) not in df.columns:
            warnings.warn(f"main_table: no {items_column(metric)!r} column (per-item results); the "
                          f"Δ {EFFECT_METRICS[metric][0]} column shows –", stacklevel=2)
    df["_row"] = pd.Series([_label(v) for v in df["label"]], index=df.index, dtype="object")
    stray = df[df["_row"].isna()]
    if len(stray):
        kinds = sorted({repr(v) for v in stray["label"]})
        warnings.warn(f"main_table: {len(stray)} runs have a label that is no table row and are not shown: "
                      f"{', '.join(kinds)}", stacklevel=2)
    df = df[df["_row"].notna()]
    duplicated = df[df.duplicated(["_row", "seed"], keep=False)]
    if len(duplicated):
        where = sorted({(k, s) for k, s in zip(duplicated["_row"], duplicated["seed"])}, key=str)
        raise ValueError(f"main_table: several runs for one (row, seed): {where}; "
                         f"filter the frame to one configuration per seed")
    summary = summarize(df, by=["_row"], metrics=list(METRICS))
    spec = pd.DataFrame([{"label": r.label, "Method": r.name, "ranked": r.ranked} for r in ROWS])
    out = spec.merge(summary.rename(columns={"_row": "label"}), on="label", how="left")
    count_cols = ["n"] + [f"{m}.n" for m in METRICS]
    out[count_cols] = out[count_cols].fillna(0).astype(int)
    effects = effects_by_row(df, "_row", out["label"].tolist(), reference, _EFFECTS, table="main_table")
    for metric, row_effects in effects.items():
        out[f"effect.{metric}"] = pd.Series(row_effects, index=out.index, dtype="object")
    return out


def _caption(df: pd.DataFrame, summary: pd.DataFrame, reference_name: str) -> str:
    seeds = seeds_of(df.loc[[_label(v) is not None for v in df["label"]], "seed"]) if "label" in df.columns else []
    caption = (
        "Main results (the paper's Table 1) on the embedded testbed: the DPO and SFT teachers evaluated as they "
        "are, and the student trained by each method. Oracle score: mean oracle reward of the model's greedy "
        "generations on the test prompts. Win rate vs ADPA (%): share of test prompts on which the generation "
        "beats ADPA's of the same seed (ties count 1/2). Margin accuracy (%): the student's implicit-reward "
        "accuracy on the test pairs (ties count 1/2; not measured for the teachers). Win rates and oracle "
        "scores are judged by the testbed's oracle. "
        f"Mean ± std over seeds {', '.join(map(str, seeds)) or '(none)'}; n = runs per row (std 0 when n = 1). "
        "Bold: best, underlined: second best among the student methods (not ranked: the two teachers, and "
        "ADPA in its own win-rate column); – : no finished run. " + effects_caption(reference_name)
    )
    names = {r.label: r.name for r in ROWS if r.ranked}  # the trained students: the teachers are evaluated as they are
    settings = settings_sentence(df, [names.get(_label(v)) for v in df["label"]]) if "label" in df.columns else ""
    limit = detection_limit_sentence({m: summary[f"effect.{m}"].tolist() for m in _EFFECTS},
                                     {m: METRICS[m] for m in _EFFECTS})
    return caption + "".join(f" {text}" for text in (settings, limit) if text)


def _ranked(summary: pd.DataFrame) -> dict[str, list[bool]]:
    """Rows competing for the marks, per metric: the teachers never; in the win-rate column not
    the ADPA row either, since it is the opponent every win rate is measured against."""
    ranked = summary["ranked"].tolist()
    opponent = [k != REFERENCE for k in summary["label"]]
    return {m: [r and o for r, o in zip(ranked, opponent)] if m == f"win_rate_vs_{REFERENCE}" else ranked
            for m in METRICS}


def format_main_table(df: pd.DataFrame, fmt: str = "markdown", reference: str = EFFECT_REFERENCE) -> str:
    """The table as Markdown or LaTeX text (with its caption), from per-run rows; the Δ columns are
    against the ``reference`` row (a label: DPO by default)."""
    summary = main_table_summary(df, reference)
    latex = fmt == "latex"
    reference_name = next(r.name for r in ROWS if r.label == reference)
    extra = {}
    for metric in _EFFECTS:
        column = f"Δ.{metric}"
        summary[column] = effect_cells(summary[f"effect.{metric}"].tolist(), METRICS[metric], summary["n"].tolist())
        extra[column] = effect_header(metric, reference_name, METRICS[metric])
    first_student = next(i for i, r in enumerate(ROWS) if r.ranked)
    first_tvkd = next(i for i, r in enumerate(ROWS) if r.label == "tvkd_released")
    return format_table(
        summary,
        metrics=METRICS,
        row_label_cols=["Method"],
        fmt=fmt,
        ranked=_ranked(summary),
        caption=_caption(df, summary, reference_name),
        label="tab:main_table" if latex else None,
        rules_before={first_student, first_tvkd},
        second_mark="underline",
        extra_cols=extra,
    )


@TABLES.register(
    "main_table", study=STUDY, paper="Table 1", outputs=("main_table.md", "main_table.tex"),
    columns=("label", "seed", *METRICS, *map(items_column, _EFFECTS)),
)
def write_main_table_tables(df: pd.DataFrame, out_dir: str | Path,
                            reference: str = EFFECT_REFERENCE) -> dict[str, Path]:
    """Write ``main_table.md`` and ``main_table.tex`` into ``out_dir`` (atomically);
    returns ``{"md": path, "tex": path}``. ``reference``: the row the Δ columns compare against."""
    paths = write_table_files(out_dir, "main_table", "reports/main_table.py",
                              lambda fmt: format_main_table(df, fmt, reference))
    return paths
