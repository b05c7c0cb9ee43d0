"""The value-alignment table (the paper's Table 4): how close each model's soft values come to the DPO teacher's.

Input: one row per finished run (the `value-alignment` study's frame) with the columns

    label                   the study variant: teacher_dpo, student_sft, dpo, tvkd, tvkd-shuffled
    seed
    value_kl                KL(teacher ‖ model) between the softmax over positions of the soft values
                            V(s_0..s_T) along the same responses (docs/methods.md §A.6); 0 for the teacher itself
    policy_kl               the token-level KL(π_T ‖ π) on the same responses
    oracle_score            mean oracle reward r*(x, y) of the model's greedy generations
    margin_accuracy         optional: the student's implicit-reward accuracy on the test pairs (not for the
                            rows evaluated as they are)
    items.oracle_score      optional: {prompt: oracle score} behind oracle_score (for the Δ columns)
    items.margin_accuracy   optional: per-test-pair outcomes behind margin_accuracy

Rows in order: the DPO teacher (the paper's first row; its KL to itself is 0, a check of the metric),
the SFT student (where every student starts), the DPO student, TVKD (ours) and the shuffled-Ψ control.
Each cell is mean ± std over seeds; a row without runs stays with "–". Only the DPO and TVKD students
are ranked for the bold / second marks. The Δ columns give each student row's paired difference to the
DPO student of the same seed with a 95% interval: per test prompt for the oracle score (crossed
seed × item model, reports/effects.py) and per seed for the value KL (the KL is one number per run: a
t-interval over the seeds).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reports.compare import PaperMap
from reports.effects import (
    Effect,
    crossed_effect,
    detection_limit_sentence,
    effect_cells,
    effect_header,
    effects_by_row,
    effects_caption,
    items_column,
)
from reports.settings import (
    ALPHA,
    BETA,
    EPOCHS,
    LEARNING_RATE,
    SETTINGS,
    VALUE_TEMPERATURE,
    describe,
    settings_sentence,
)
from reports.tables import TABLES, MetricSpec, format_seeds, format_table, summarize, write_table_files
from tvkd.evaluation.value_alignment import DEFAULT_VALUE_TEMPERATURE

__all__ = ["METRICS", "ROWS", "format_value_alignment", "value_alignment_summary", "write_value_alignment"]

STUDY = "value-alignment"
REFERENCE = "dpo"
METRICS: dict[str, MetricSpec] = {
    "value_kl": MetricSpec("KL with teacher value", higher_is_better=False, digits=4),
    "policy_kl": MetricSpec("Policy KL", higher_is_better=False, digits=3),
    "oracle_score": MetricSpec("Oracle score", higher_is_better=True, digits=3),
    "margin_accuracy": MetricSpec("Margin accuracy (%)", higher_is_better=True, digits=1, percent=True),
}
#: Metrics whose Δ column pairs per-item results; ``value_kl`` pairs per seed.
ITEM_EFFECTS = ("oracle_score",)
SEED_EFFECTS = ("value_kl",)


@dataclass(frozen=True)
class TableRow:
    label: str
    name: str
    ranked: bool = True


ROWS: tuple[TableRow, ...] = (
    TableRow("teacher_dpo", "DPO Teacher", ranked=False),
    TableRow("student_sft", "SFT Student (start)", ranked=False),
    TableRow("dpo", "DPO Student"),
    TableRow("tvkd", "TVKD (ours)"),
    TableRow("tvkd-shuffled", "TVKD, shuffled Ψ (control)", ranked=False),
)


def _seed_effects(df: pd.DataFrame, metric: str, keys: list[str]) -> list[Effect | None]:
    """Per row: the mean over seeds of (row − DPO) in ``metric``, with a t-interval over the seeds."""
    ref = {s: v for s, v in zip(df.loc[df["label"] == REFERENCE, "seed"], df.loc[df["label"] == REFERENCE, metric])
           if v is not None and not math.isnan(float(v))}
    out: list[Effect | None] = []
    for key in keys:
        if key == REFERENCE:
            out.append(None)
            continue
        part = df[df["label"] == key]
        diffs = [np.array([float(v) - ref[s]]) for s, v in zip(part["seed"], part[metric])
                 if s in ref and v is not None and not math.isnan(float(v))]
        out.append(crossed_effect(diffs) if diffs else None)
    return out


def value_alignment_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per `ROWS` entry, in order: label, Name, ranked, n, ``<metric>.mean/.std/.n``, and
    ``effect.<metric>`` for the Δ metrics (an `Effect` against the DPO student, or None)."""
    absent = [c for c in ("label", "seed") if c not in df.columns]
    if absent:
        raise KeyError(f"value_alignment: columns {absent} are missing; the frame has {list(df.columns)}")
    keys = [r.label for r in ROWS]
    stray = sorted(set(df["label"]) - set(keys))
    if stray:
        warnings.warn(f"value_alignment: runs of labels {stray} match no table row and are not shown", stacklevel=2)
    df = df[df["label"].isin(keys)].copy()
    for metric in METRICS:
        if metric not in df.columns:
            df[metric] = math.nan
    duplicated = df[df.duplicated(["label", "seed"], keep=False)]
    if len(duplicated):
        where = sorted({(k, s) for k, s in zip(duplicated["label"], duplicated["seed"])}, key=str)
        raise ValueError(f"value_alignment: several runs for one (row, seed): {where}; filter the frame to one "
                         "configuration per seed")
    summary = summarize(df, by=["label"], metrics=list(METRICS)).set_index("label").reindex(keys).reset_index()
    summary["Name"] = [r.name for r in ROWS]
    summary["ranked"] = [r.ranked for r in ROWS]
    counts = ["n"] + [f"{m}.n" for m in METRICS]
    summary[counts] = summary[counts].fillna(0).astype(int)
    effects = effects_by_row(df, "label", keys, REFERENCE, ITEM_EFFECTS, table="value_alignment")
    for metric in SEED_EFFECTS:
        effects[metric] = _seed_effects(df, metric, keys)
    for metric, row_effects in effects.items():
        # the teacher and the SFT start are not trained: a Δ against a trained student says nothing about a method
        row_effects = [None if not r.ranked and r.label != "tvkd-shuffled" else e for r, e in zip(ROWS, row_effects)]
        summary[f"effect.{metric}"] = pd.Series(row_effects, index=summary.index, dtype="object")
    return summary


def format_value_alignment(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """The table as Markdown or LaTeX text (with its caption)."""
    summary = value_alignment_summary(df)
    latex = fmt == "latex"
    extra = {}
    for metric in (*SEED_EFFECTS, *ITEM_EFFECTS):
        column = f"Δ.{metric}"
        spec = METRICS[metric]
        summary[column] = effect_cells(summary[f"effect.{metric}"].tolist(), spec, summary["n"].tolist())
        extra[column] = (effect_header(metric, "DPO", spec) if metric in ITEM_EFFECTS
                         else "Δ value KL vs DPO [95% CI, seeds]")
    second = "underlined" if latex else "italic"
    caption = (
        "Value alignment with the DPO teacher (the paper's Table 4): KL between the softmax over positions of "
        f"the teacher's and the model's soft values{_value_temperature(df)} along the same chosen training responses, the "
        "token-level policy KL, and the scores. The DPO teacher's KL to itself is 0 by definition; the teacher and "
        "the SFT student are evaluated as they are (std 0). "
        f"Mean ± std over seeds {format_seeds(df.loc[df['label'].isin([r.label for r in ROWS]), 'seed'])}; n = runs per row. "
        f"Bold: best, {second}: second best among the DPO and TVKD students. "
        + effects_caption("DPO")
        + " Δ value KL: the per-seed difference, averaged, with a 95% t-interval over the seeds (df = seeds − 1)."
    )
    names = {r.label: r.name for r in ROWS}
    settings = settings_sentence(df, [names.get(v) for v in df["label"]],
                                 {c: SETTINGS[c] for c in (ALPHA, BETA, LEARNING_RATE, EPOCHS)})
    limit = detection_limit_sentence({m: summary[f"effect.{m}"].tolist() for m in ITEM_EFFECTS},
                                     {m: METRICS[m] for m in ITEM_EFFECTS})
    caption += "".join(f" {text}" for text in (settings, limit) if text)
    return format_table(summary, metrics=METRICS, row_label_cols={"Name": "Model"}, fmt=fmt,
                        ranked=summary["ranked"].tolist(), caption=caption,
                        label="tab:value_alignment" if latex else None, rules_before={1, 2, 4}, extra_cols=extra)


def _value_temperature(df: pd.DataFrame) -> str:
    """" (β_V 2)" as the runs' configs give the soft values' temperature, the rows whose loss has none (DPO) at
    the evaluator's default; "" when the frame records none."""
    names = {r.label: r.name for r in ROWS}
    rows = [names.get(v) for v in df["label"]]
    text = describe(df, VALUE_TEMPERATURE, rows, "β_V")
    if text is None:
        return ""
    have = {n for n, v in zip(rows, df[VALUE_TEMPERATURE]) if n and v is not None and v == v}
    without = [n for n in dict.fromkeys(rows) if n and n not in have]
    if without:
        text += f"; {', '.join(without)}: the evaluator's default β_V {DEFAULT_VALUE_TEMPERATURE:g}, its loss having none"
    return f" ({text})"


#: ``tvkd report --study value-alignment --compare-paper``: Table 4 beside ours (reports/compare.py). On the testbed
#: the oracle score stands in for MT-Bench unless the runs were benchmarked; the teacher's KL cell is blank in the paper.
#: The value KL is compared only by TVKD's sign against DPO through the table's paired per-seed t-interval (the Δ value
#: KL column): a difference whose interval includes 0 is "not shown", never "reversed".
PAPER_MAPS = (
    PaperMap(name="table4", table="table4", row_column="model", column_column="metric",
             rows={"teacher_dpo": "DPO Teacher", "dpo": "DPO Student", "tvkd": "Ours"},
             columns={"KL-div. with Teacher Value": ("value_kl",), "MT-Bench": ("mt_bench/score", "oracle_score")},
             row_key="label", baseline="dpo", unranked=("teacher_dpo",), lower_is_better=("KL-div. with Teacher Value",),
             by_sign=("KL-div. with Teacher Value",), subject="students", baseline_is_subject=True),
)


@TABLES.register("value_alignment", study=STUDY, paper="Table 4",
                 outputs=("value_alignment.md", "value_alignment.tex"),
                 columns=("label", "seed", *METRICS, *map(items_column, ITEM_EFFECTS)))
def write_value_alignment(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``value_alignment.md`` and ``value_alignment.tex`` into ``out_dir``."""
    paths = write_table_files(out_dir, "value_alignment", "reports/value_alignment.py",
                              lambda fmt: format_value_alignment(df, fmt))
    return paths
