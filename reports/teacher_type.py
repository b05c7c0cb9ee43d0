"""The teacher-type tables (the paper's Tables 8 and 9): DCKD and TVKD distilled from three kinds of teacher.

Input: one row per finished run (the `teacher-type` study's frame) with the columns

    variant                 the method: dckd, tvkd, or dpo (the student's own DPO: no teacher, the control)
    teacher                 the teacher type (the study's named axis): dpo, sft, instruct; empty for DPO
    seed
    oracle_score            mean oracle reward r*(x, y) of the student's greedy generations (Table 8's RM)
    margin_accuracy         the student's implicit-reward accuracy on the test pairs
    items.oracle_score      optional: {prompt: oracle score} (for the Δ columns)

Rows: DCKD and TVKD (ours), as in the paper, then DPO (no teacher; the same runs serve every column
group). Column groups: the DPO teacher, the SFT teacher and the instruct-like teacher, each with the
oracle score, margin accuracy (mean ± std over seeds) and the paired difference in oracle score to
DPO of the same seed (95% crossed seed × item interval, reports/effects.py).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from reports.compare import PaperMap
from reports.effects import effects_caption, items_column
from reports.model_ablation import (
    METRICS,
    Group,
    Method,
    _groups,
    format_grouped,
    grouped_summary,
    method_settings,
)
from reports.settings import CONFIG, describe
from reports.tables import TABLES, format_seeds, write_table_files

__all__ = ["METHODS", "TEACHERS", "format_teacher_type", "write_teacher_type"]

STUDY = "teacher-type"
METHODS: tuple[Method, ...] = (Method("dckd", "DCKD"), Method("tvkd", "TVKD (ours)"),
                               Method("dpo", "DPO (no teacher)"))
TEACHERS: tuple[Group, ...] = (Group("dpo", "DPO teacher"), Group("sft", "SFT teacher"),
                               Group("instruct", "Instruct-like teacher"))


def format_teacher_type(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """The table as Markdown or LaTeX text (with its caption)."""
    groups = _groups(df, "teacher", TEACHERS) if "teacher" in df.columns else list(TEACHERS)
    summary = grouped_summary(df, "teacher", groups, METHODS, shared_reference=True, table="teacher_type")
    second = "underlined" if fmt == "latex" else "italic"
    recipe = _instruct_recipe(df)
    caption = (
        "Teacher types (the paper's Tables 8 and 9): DCKD and TVKD distilled from the DPO teacher, the SFT teacher "
        "(before its DPO stage) and an instruct-like teacher"
        + (f" (the SFT teacher aligned by another recipe: {recipe}, a vendor's heavier alignment rather than the "
           "paper's careful one)" if recipe else "")
        + ", against the student's own DPO (no teacher, the same runs in every group). Oracle score (the testbed's "
        f"reward model, Table 8's RM) and margin accuracy, mean ± std over seeds {format_seeds(df['seed'])}; n = runs "
        f"per row. Bold: best, {second}: second best per column. " + effects_caption("DPO")
    )
    settings = method_settings(df, METHODS)
    return format_grouped(summary, groups, fmt, caption + (f" {settings}" if settings else ""), "tab:teacher_type")


#: The testbed settings that rebuild the instruct-like teacher's DPO stage, and how the caption names them.
_RECIPE = {"dpo_epochs": "DPO epochs", "dpo_lr": "learning rate", "dpo_beta": "β"}


def _instruct_recipe(df: pd.DataFrame) -> str:
    """The instruct-like teacher's DPO recipe as its runs' configs override the testbed ("DPO epochs 3, learning
    rate 0.0001, β 0.1"), or "" when they record none (a real instruct model, a frame without config columns)."""
    if "teacher" not in df.columns:
        return ""
    rows = ["instruct" if t == "instruct" else None for t in df["teacher"]]
    parts = [describe(df, f"{CONFIG}testbed.{key}", rows, name) for key, name in _RECIPE.items()]
    return ", ".join(p for p in parts if p)


def _teacher_rows(variant: str):
    """Our row key per run (its teacher type) for the runs of one method; None for the others."""
    def rows_of(df: pd.DataFrame) -> pd.Series:
        variants = df["variant"] if "variant" in df.columns else df["label"]
        teachers = df["teacher"] if "teacher" in df.columns else pd.Series([None] * len(df), index=df.index)
        return pd.Series([t if v == variant else None for v, t in zip(variants, teachers)], index=df.index,
                         dtype="object")
    return rows_of


#: ``tvkd report --study teacher-type --compare-paper``: per method, the paper's ordering of the three teacher types
#: (Table 8: RM, the oracle score on the testbed; Table 9: MT-Bench, after ``tvkd eval --bench mt-bench``). The
#: paper prints TVKD as "TPKD" in these tables.
PAPER_MAPS = tuple(
    PaperMap(name=f"{table}_{variant}", table=table, row_column="teacher_type", column_column="metric",
             where={"method": method}, rows={"dpo": "DPO", "sft": "SFT", "instruct": "Instruct"},
             columns=columns, rows_of=_teacher_rows(variant), baseline="dpo", subject=f"teacher types for {name}",
             baseline_is_subject=True)
    for table, columns in (("table8", {"RM": ("rm/score", "oracle_score")}), ("table9", {"MT-bench": ("mt_bench/score",)}))
    for variant, method, name in (("dckd", "DCKD", "DCKD"), ("tvkd", "TPKD", "TVKD"))
)


@TABLES.register("teacher_type", study=STUDY, paper="Tables 8, 9", outputs=("teacher_type.md", "teacher_type.tex"),
                 columns=("variant", "teacher", "seed", *METRICS, items_column("oracle_score")))
def write_teacher_type(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``teacher_type.md`` and ``teacher_type.tex`` into ``out_dir``."""
    paths = write_table_files(out_dir, "teacher_type", "reports/teacher_type.py",
                              lambda fmt: format_teacher_type(df, fmt))
    return paths
