"""The model ablation (the paper's Table 2): each method under three teacher → student pairs, and the
grouped table it shares with the teacher-type tables (reports/teacher_type.py).

Input: one row per finished run (the `model-ablation` study's frame) with the columns

    variant                 the method: dpo, simpo, dckd, tvkd (``label`` when there is no ``variant``)
    pair                    the teacher → student pair (the study's named axis; its label)
    seed
    oracle_score            mean oracle reward r*(x, y) of the student's greedy generations (the RM column)
    margin_accuracy         the student's implicit-reward accuracy on the test pairs
    items.oracle_score      optional: {prompt: oracle score} (for the Δ columns)

Rows: DPO, SimPO, DCKD, TVKD (ours), as in the paper. Column groups: one per pair, in the spec's order,
each with the oracle score and margin accuracy (mean ± std over seeds) and the paired difference in
oracle score to DPO *of the same pair* and seed with a 95% crossed seed × item interval
(reports/effects.py). Every method is ranked within each column. A metric resting on fewer runs than
the row's count carries "(n=k)".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from reports.compare import PaperMap
from reports.effects import (
    EFFECT_METRICS,
    detection_limit_sentence,
    effects_by_row,
    effects_caption,
    format_effect,
    items_column,
)
from reports.settings import settings_sentence
from reports.tables import TABLES, MetricSpec, format_seeds, format_table, summarize, write_table_files

__all__ = ["METRICS", "Group", "Method", "format_grouped", "format_model_ablation", "grouped_summary",
           "write_model_ablation"]

STUDY = "model-ablation"
REFERENCE = "dpo"
METRICS: dict[str, MetricSpec] = {
    "oracle_score": MetricSpec("oracle", higher_is_better=True, digits=3),
    "margin_accuracy": MetricSpec("margin acc. (%)", higher_is_better=True, digits=1, percent=True),
}
EFFECT = "oracle_score"


@dataclass(frozen=True)
class Method:
    """A table row: the study variant it shows and its name in the paper."""

    variant: str
    name: str
    ranked: bool = True


@dataclass(frozen=True)
class Group:
    """A column group: the value of the grouping column it shows and its header."""

    key: str
    name: str


METHODS: tuple[Method, ...] = (Method("dpo", "DPO"), Method("simpo", "SimPO"), Method("dckd", "DCKD"),
                               Method("tvkd", "TVKD (ours)"))
#: The testbed's three pairs (studies/model_ablation.yaml), named like the paper's.
PAIRS: tuple[Group, ...] = (
    Group("small-student", "T 4×128 → S 1×32"),
    Group("base", "T 4×128 → S 2×64"),
    Group("large", "T 6×192 → S 3×96"),
)


def _variants(df: pd.DataFrame) -> pd.Series:
    column = "variant" if "variant" in df.columns else "label"
    return df[column].astype("object")


def _groups(df: pd.DataFrame, group_col: str, known: Sequence[Group]) -> list[Group]:
    """The known groups the frame has (all of them for a frame without any), then any other value of the grouping
    column found in the frame, in order (e.g. a profile's own pairs)."""
    seen = [str(v) for v in dict.fromkeys(df[group_col]) if isinstance(v, str) and v]
    names = {g.key for g in known}
    found = [g for g in known if g.key in seen] + [Group(v, v) for v in seen if v not in names]
    return found or list(known)


def grouped_summary(df: pd.DataFrame, group_col: str, groups: Sequence[Group], methods: Sequence[Method],
                    *, shared_reference: bool = False, table: str = "table") -> pd.DataFrame:
    """One row per method: ``variant``, ``Method``, ``ranked``, ``n`` (the most runs it has in any group) and,
    per group ``g`` and metric ``m``, ``g.m.mean/.std/.n``, plus ``g.effect``: the paired effect in oracle
    score against DPO within the group (an `Effect` or None).

    ``shared_reference``: DPO has no value in the grouping column (it has no teacher) and serves as the
    reference of every group.
    """
    absent = [c for c in ("seed", group_col) if c not in df.columns]
    if absent:
        raise KeyError(f"{table}: columns {absent} are missing; the frame has {list(df.columns)}")
    df = df.copy()
    df["_variant"] = _variants(df)
    for metric in METRICS:
        if metric not in df.columns:
            df[metric] = math.nan
    keys = [m.variant for m in methods]
    stray = sorted(set(df["_variant"].astype(str)) - set(keys))
    if stray:
        warnings.warn(f"{table}: runs of variants {stray} match no table row and are not shown", stacklevel=3)
    df = df[df["_variant"].isin(keys)]
    reference_runs = df[df["_variant"] == REFERENCE] if shared_reference else None
    out = pd.DataFrame({"variant": keys, "Method": [m.name for m in methods], "ranked": [m.ranked for m in methods]})
    counts = pd.Series(0, index=out.index)
    for group in groups:
        part = df[df[group_col] == group.key]
        if shared_reference:
            part = pd.concat([part[part["_variant"] != REFERENCE], reference_runs])
        duplicated = part[part.duplicated(["_variant", "seed"], keep=False)]
        if len(duplicated):
            where = sorted({(v, s) for v, s in zip(duplicated["_variant"], duplicated["seed"])}, key=str)
            raise ValueError(f"{table}: several runs for one ({group.key}, method, seed): {where}")
        summary = summarize(part, by=["_variant"], metrics=list(METRICS)).set_index("_variant").reindex(keys)
        for metric in METRICS:
            for stat in ("mean", "std", "n"):
                out[f"{group.key}.{metric}.{stat}"] = summary[f"{metric}.{stat}"].to_numpy()
            out[f"{group.key}.{metric}.n"] = out[f"{group.key}.{metric}.n"].fillna(0).astype(int)
        counts = counts.combine(pd.Series(summary["n"].fillna(0).astype(int).to_numpy(), index=out.index), max)
        effects = effects_by_row(part, "_variant", keys, REFERENCE, [EFFECT], table=f"{table}: {group.key}")
        out[f"{group.key}.effect"] = pd.Series(effects[EFFECT], index=out.index, dtype="object")
    out["n"] = counts.astype(int)
    return out


def format_grouped(summary: pd.DataFrame, groups: Sequence[Group], fmt: str, caption: str, label: str) -> str:
    """The grouped table: per group its metrics and its Δ oracle column; the headers name the group."""
    metrics: dict[str, MetricSpec] = {}
    extra: dict[str, str] = {}
    effects = {}
    spec = METRICS[EFFECT]
    for group in groups:
        for metric, m in METRICS.items():
            metrics[f"{group.key}.{metric}"] = MetricSpec(f"{group.name}: {m.label}", m.higher_is_better, m.digits,
                                                          m.percent)
        column = f"Δ.{group.key}"
        summary[column] = [format_effect(e, spec) for e in summary[f"{group.key}.effect"]]
        extra[column] = f"{group.name}: Δ {EFFECT_METRICS[EFFECT][0]} vs DPO [95% CI]"
        effects[group.key] = summary[f"{group.key}.effect"].tolist()
    limit = detection_limit_sentence({EFFECT: [e for row in effects.values() for e in row]}, {EFFECT: spec})
    return format_table(summary, metrics=metrics, row_label_cols={"Method": "Method"}, fmt=fmt,
                        ranked=summary["ranked"].tolist(), caption=caption + (f" {limit}" if limit else ""),
                        label=label if fmt == "latex" else None, extra_cols=extra)


def format_model_ablation(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """The table as Markdown or LaTeX text (with its caption)."""
    groups = _groups(df, "pair", PAIRS) if "pair" in df.columns else list(PAIRS)
    summary = grouped_summary(df, "pair", groups, METHODS, table="model_ablation")
    second = "underlined" if fmt == "latex" else "italic"
    caption = (
        "Model ablation (the paper's Table 2): each method under three teacher → student pairs of the testbed "
        "(T/S: layers × hidden size of the teacher and the student; each pair is its own testbed build, its "
        "student's pairs sampled from that student). Oracle score (the testbed's reward model) and margin "
        f"accuracy, mean ± std over seeds {format_seeds(df['seed'])}; n = runs per row. Bold: best, {second}: second best per "
        "column. " + effects_caption("DPO") + " Each pair's Δ is against DPO under the same pair."
    )
    settings = method_settings(df, METHODS)
    return format_grouped(summary, groups, fmt, caption + (f" {settings}" if settings else ""), "tab:model_ablation")


def method_settings(df: pd.DataFrame, methods: Sequence[Method]) -> str:
    """The caption's settings sentence (α, β, β_V, learning rate, epochs from the runs), per method row."""
    names = {m.variant: m.name for m in methods}
    return settings_sentence(df, [names.get(v) for v in _variants(df)])


#: The paper's pairs (its Table 2, left to right) and the study's pair labels for them: the testbed's, then the
#: paper profile's.
PAPER_PAIRS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Mistral-7B", "Danube-500M", ("small-student", "mistral7b-danube500m")),
    ("Mistral-7B", "Llama-1B", ("base", "mistral7b-llama1b")),
    ("Llama-8B", "Llama-3B", ("large", "llama8b-llama3b")),
)


def _pair_rows(labels: tuple[str, ...]):
    """Our row key per run (its method) for the runs of one pair; None for the other pairs' runs."""
    def rows_of(df: pd.DataFrame) -> pd.Series:
        pairs = df["pair"] if "pair" in df.columns else pd.Series([None] * len(df), index=df.index)
        return pd.Series([v if p in labels else None for v, p in zip(_variants(df), pairs)], index=df.index,
                         dtype="object")
    return rows_of


#: ``tvkd report --study model-ablation --compare-paper``: each pair of Table 2 beside ours (reports/compare.py);
#: on the testbed the oracle score stands in for the RM score.
PAPER_MAPS = tuple(
    PaperMap(name=f"table2_{labels[1].replace('-', '_')}", table="table2", row_column="method", column_column="metric",
             where={"teacher": teacher, "student": student},
             rows={"dpo": "DPO", "simpo": "SimPO", "dckd": "DCKD", "tvkd": "Ours"},
             columns={"RM": ("rm/score", "oracle_score"), "MT": ("mt_bench/score",)}, rows_of=_pair_rows(labels),
             baseline="dpo", subject="methods", baseline_is_subject=True)
    for teacher, student, labels in PAPER_PAIRS
)


@TABLES.register("model_ablation", study=STUDY, paper="Table 2", outputs=("model_ablation.md", "model_ablation.tex"),
                 columns=("variant", "pair", "seed", *METRICS, items_column(EFFECT)))
def write_model_ablation(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``model_ablation.md`` and ``model_ablation.tex`` into ``out_dir``."""
    paths = write_table_files(out_dir, "model_ablation", "reports/model_ablation.py",
                              lambda fmt: format_model_ablation(df, fmt))
    return paths
