"""The table of any study without a generator of its own: mean ± std per run configuration, and the paired
interval against the study's reference, Markdown + LaTeX (``grid.md`` / ``grid.tex``).

A study file of your own (variants, axes) gets this table from ``tvkd study run`` and ``tvkd report
--study my-grid.yaml``: one row per configuration (its variant and axis values as the label columns, in
run order), one "mean ± std" column per metric the runs have (of `GRID_METRICS`), and, when the spec
names a ``reference_variant``, one "Δ vs <reference> [95% CI]" column per metric with per-item results
(`reports.effects`): each row against the reference's run of the same seed and, when the reference is a
variant label, of the same axis values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reports.effects import (
    EFFECT_METRICS,
    effect_cells,
    effect_header,
    effects_caption,
    items_column,
    paired_effect,
)
from reports.settings import CONFIG, SETTINGS, settings_sentence
from reports.tables import MetricSpec, format_table, summarize, write_table_files
from studies.spec import reference_label

__all__ = ["GRID_METRICS", "grid_summary", "write_grid_tables"]

#: The metrics a grid table shows, in this order, when its runs have them.
GRID_METRICS: dict[str, MetricSpec] = {
    "oracle_score": MetricSpec("Oracle score", digits=3),
    "margin_accuracy": MetricSpec("Margin accuracy (%)", digits=1, percent=True),
    "rm_score": MetricSpec("RM score", digits=3),
    "win_rate": MetricSpec("Win rate (%)", digits=1, percent=True),
    "value_kl": MetricSpec("Value KL", higher_is_better=False, digits=4),
    "mt_bench/score": MetricSpec("MT-Bench", digits=2),
}


def _label_columns(spec: Any, df: pd.DataFrame) -> list[str]:
    """The variant and axis columns of the frame (``label`` for a variants-only study)."""
    cols = (["variant"] if spec.variants and spec.axes else []) + [a.name for a in spec.axes]
    return [c for c in cols if c in df.columns] or ["label"]


def grid_summary(spec: Any, df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, MetricSpec], list[str], list[str]]:
    """(the summary with one row per configuration, the metrics shown, the label columns, the Δ columns)."""
    metrics = {m: s for m, s in GRID_METRICS.items() if m in df.columns and df[m].notna().any()}
    if "win_rate" not in metrics:
        ref_col = f"win_rate_vs_{spec.reference_variant}"
        if ref_col in df.columns and df[ref_col].notna().any():
            df = df.assign(win_rate=df[ref_col])
            metrics = {**metrics, "win_rate": MetricSpec(f"Win rate vs {spec.reference_variant} (%)", digits=1,
                                                         percent=True)}
    label_cols = _label_columns(spec, df)
    summary = summarize(df, ["label", *[c for c in label_cols if c != "label"]], list(metrics))
    delta_cols: list[str] = []
    reference = spec.reference_variant
    if reference:
        labels = set(df["label"])
        first = df.drop_duplicates("label").set_index("label")
        for metric in [m for m in EFFECT_METRICS if m in metrics and items_column(m) in df.columns]:
            column = items_column(metric)
            by_label: dict[str, dict[Any, Any]] = {}
            for label, seed, items in zip(df["label"], df["seed"], df[column]):
                if isinstance(items, (dict, list)):
                    by_label.setdefault(label, {})[seed] = items
            effects = []
            for label in summary["label"]:
                ref = reference_label(reference, label, first.loc[label].get("variant"), labels)
                effects.append(None if ref is None or ref == label else paired_effect(
                    by_label.get(label, {}), by_label.get(ref, {}), where=f"grid: {column} of row {label!r}"))
            header = effect_header(metric, reference, metrics[metric])
            summary[header] = effect_cells(effects, metrics[metric], list(summary["n"]))
            delta_cols.append(header)
    return summary, metrics, label_cols, delta_cols


def write_grid_tables(spec: Any, df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """``grid.md`` and ``grid.tex`` of a study's frame into ``out_dir``; returns ``{format: path}``."""
    summary, metrics, label_cols, delta_cols = grid_summary(spec, df)
    seeds = sorted({int(s) for s in df["seed"] if pd.notna(s)})
    caption = (f"{spec.name}: mean ± std over seeds ({', '.join(map(str, seeds))}) per configuration; n: runs."
               + (" " + effects_caption(spec.reference_variant) if delta_cols else ""))
    swept = {CONFIG + a.name for a in spec.axes}  # a setting an axis sweeps is the rows' own: not restated
    settings = settings_sentence(df, df["label"].tolist(), {c: s for c, s in SETTINGS.items() if c not in swept}
                                 ) if "label" in df.columns else ""
    caption += f" {settings}" if settings else ""
    select = getattr(spec, "select", None)
    if select is not None and select.axis is not None:  # the frame holds the picked runs (reports.selection)
        caption += (f" Each row: test numbers at the {select.axis} picked on the validation split by the best mean "
                    f"{select.column} over seeds (selection.md lists every candidate).")
    elif select is not None:
        caption += (f" Each run: test numbers of its checkpoint picked on the validation split by the best "
                    f"{select.column} (selection.md lists every candidate).")
    return write_table_files(out_dir, "grid", "reports/grid.py", lambda fmt: format_table(
        summary, metrics=metrics, row_label_cols=label_cols, fmt=fmt, extra_cols=delta_cols, caption=caption,
        label=f"tab:{spec.name}" if fmt == "latex" else None))
