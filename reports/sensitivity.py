"""Sensitivity curves (the paper's Figure 4): TVKD against one hyper-parameter, with DPO as the reference line.

Two studies share this generator: `alpha-sensitivity` (Figure 4a: the distillation strength α,
``loss.alpha``) and `beta-sensitivity` (Figure 4b: the soft-value temperature β_V,
``loss.value_temperature``). Input: one row per finished run (the study frame) with the columns

    method                  "tvkd" or "dpo"
    control                 "none" | "shuffled" (missing/None reads as "none")
    <axis>                  the swept value of a TVKD run (``loss.alpha`` or ``loss.value_temperature``);
                            empty for DPO, which has no such parameter
    seed
    oracle_score            mean oracle reward r*(x, y) of the run's greedy generations
    margin_accuracy         fraction in [0, 1] (docs/methods.md §A.6)
    items.oracle_score      optional: {prompt: oracle score} behind oracle_score (for the Δ columns)
    items.margin_accuracy   optional: per-test-pair outcomes behind margin_accuracy

Rows: DPO first, then TVKD at each value (ascending), then the shuffled-Ψ control at each value (the
same teacher offsets permuted across pairs: what an offset of that size does without the teacher's
knowledge). Each cell is mean ± std over seeds with the runs per row; the Δ columns give the paired
difference to DPO of the same seed with a 95% crossed seed × item interval (reports/effects.py).
Only the TVKD rows and DPO are ranked for the bold / second marks; the controls are diagnostics.

The figure (PNG and PDF, byte-identical for the same frame) has one panel per metric: the metric
against the parameter (log scale) for TVKD and its shuffled control, each point the mean over seeds
with a ±1 std bar, and DPO as a horizontal line with its ±1 std band.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reports.effects import (
    detection_limit_sentence,
    effect_cells,
    effect_header,
    effects_by_row,
    effects_caption,
    items_column,
)
from reports.figures import save_figure
from reports.settings import CONFIG, SETTINGS, settings_sentence
from reports.tables import TABLES, MetricSpec, format_seeds, format_table, summarize, write_table_files

__all__ = ["ALPHA", "BETA", "METRICS", "Sweep", "format_sensitivity", "plot_sensitivity", "sensitivity_summary",
           "write_sensitivity"]

METRICS: dict[str, MetricSpec] = {
    "oracle_score": MetricSpec("Oracle score", higher_is_better=True, digits=3),
    "margin_accuracy": MetricSpec("Margin accuracy (%)", higher_is_better=True, digits=1, percent=True),
}
REFERENCE = "dpo"
#: Row kinds in table order, with their display names.
KINDS = {"dpo": "DPO", "tvkd": "TVKD", "shuffled": "TVKD (shuffled Ψ)"}


@dataclass(frozen=True)
class Sweep:
    """One sensitivity study: its name, the swept run-config key, and how the parameter is written."""

    study: str
    table: str
    axis: str  # the frame column holding the swept value
    symbol: str  # the parameter in text, e.g. "α"
    title: str  # the figure's subject
    paper: str


ALPHA = Sweep("alpha-sensitivity", "alpha_sensitivity", "loss.alpha", "α",
              "distillation strength α", "Figure 4a")
BETA = Sweep("beta-sensitivity", "beta_sensitivity", "loss.value_temperature", "β_V",
             "soft-value temperature β_V", "Figure 4b")


def _text(value: object, default: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    text = str(value).strip().lower()
    return default if text in ("", "none", "null", "nan") else text


def _value(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return None if math.isnan(float(value)) else float(value)
    try:
        number = float(str(value))
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _number(value: float) -> str:
    """A parameter value as the paper writes it: 0.1, 0.5, 1, 1.5, 2."""
    return f"{value:g}"


def _assign(df: pd.DataFrame, sweep: Sweep) -> pd.DataFrame:
    """The frame with ``_kind``, ``_value`` and ``_row`` (None for runs that belong to no row)."""
    df = df.copy()
    methods = [_text(m, "") for m in df["method"]]
    controls = [_text(c, "none") for c in df["control"]] if "control" in df.columns else ["none"] * len(df)
    values = [_value(v) for v in df[sweep.axis]] if sweep.axis in df.columns else [None] * len(df)
    kinds, rows = [], []
    for method, control, value in zip(methods, controls, values):
        if method == "dpo" and control == "none":
            kind, row = "dpo", REFERENCE
        elif method == "tvkd" and control in ("none", "shuffled") and value is not None:
            kind = "tvkd" if control == "none" else "shuffled"
            row = f"{kind}@{_number(value)}"
        else:
            kind, row = None, None
        kinds.append(kind)
        rows.append(row)
    df["_kind"], df["_row"] = kinds, rows
    df["_value"] = pd.Series(values, index=df.index, dtype="object")
    stray = int(sum(r is None for r in rows))
    if stray:
        warnings.warn(f"{sweep.table}: {stray} runs match no row (not DPO, or a TVKD run without a {sweep.axis} "
                      "value) and are not shown", stacklevel=3)
    return df[df["_row"].notna()]


def sensitivity_summary(df: pd.DataFrame, sweep: Sweep = ALPHA) -> pd.DataFrame:
    """One row per table row, in table order: key, kind, value, Row, Param, ranked, n, the mean ± std
    columns of `summarize`, and per metric ``effect.<metric>`` (the paired effect against DPO or None).

    Raises KeyError when ``method`` or ``seed`` is missing and ValueError when a row holds two runs of
    one seed (the frame mixes configurations).
    """
    absent = [c for c in ("method", "seed") if c not in df.columns]
    if absent:
        raise KeyError(f"{sweep.table}: columns {absent} are missing; the frame has {list(df.columns)}")
    df = _assign(df, sweep)
    for metric in METRICS:
        if metric not in df.columns:
            df[metric] = math.nan
    duplicated = df[df.duplicated(["_row", "seed"], keep=False)]
    if len(duplicated):
        where = sorted({(k, s) for k, s in zip(duplicated["_row"], duplicated["seed"])}, key=str)
        raise ValueError(f"{sweep.table}: several runs for one (row, seed): {where}; filter the frame to one "
                         "configuration per seed")
    values = sorted({v for v in df["_value"] if v is not None and not math.isnan(v)})
    order = [(REFERENCE, "dpo", None)] + [(f"{k}@{_number(v)}", k, v) for k in ("tvkd", "shuffled") for v in values]
    summary = summarize(df, by=["_row"], metrics=list(METRICS)).set_index("_row")
    keys = [k for k, _, _ in order]
    summary = summary.reindex(keys).reset_index().rename(columns={"_row": "key"})
    summary["kind"] = [k for _, k, _ in order]
    summary["value"] = [v for _, _, v in order]
    summary["Row"] = [KINDS[k] for _, k, _ in order]
    summary["Param"] = ["–" if v is None else _number(v) for _, _, v in order]
    summary["ranked"] = [k != "shuffled" for _, k, _ in order]
    counts = ["n"] + [f"{m}.n" for m in METRICS]
    summary[counts] = summary[counts].fillna(0).astype(int)
    effects = effects_by_row(df, "_row", keys, REFERENCE, METRICS, table=sweep.table)
    for metric, row_effects in effects.items():
        summary[f"effect.{metric}"] = pd.Series(row_effects, index=summary.index, dtype="object")
    return summary


def format_sensitivity(df: pd.DataFrame, fmt: str = "markdown", sweep: Sweep = ALPHA) -> str:
    """The table as Markdown or LaTeX text (with its caption)."""
    summary = sensitivity_summary(df, sweep)
    latex = fmt == "latex"
    extra = {}
    for metric, spec in METRICS.items():
        column = f"Δ.{metric}"
        summary[column] = effect_cells(summary[f"effect.{metric}"].tolist(), spec, summary["n"].tolist())
        extra[column] = effect_header(metric, "DPO", spec)
    shown = _assign(df, sweep)
    second = "underlined" if latex else "italic"
    caption = (
        f"Sensitivity to the {sweep.title} (the paper's {sweep.paper}): TVKD (soft_value) at each value, its "
        f"shuffled-Ψ control (the same teacher offsets permuted across pairs) and DPO (no {sweep.symbol}). "
        f"Mean ± std over seeds {format_seeds(shown['seed'])}; n = runs per row. "
        f"Bold: best, {second}: second best among TVKD and DPO (the controls are not ranked); – : no finished run. "
        + effects_caption("DPO")
    )
    # the settings held fixed (the swept one is the rows' own)
    settings = settings_sentence(shown, [KINDS[k] for k in shown["_kind"]],
                                 {c: s for c, s in SETTINGS.items() if c != CONFIG + sweep.axis})
    limit = detection_limit_sentence({m: summary[f"effect.{m}"].tolist() for m in METRICS}, METRICS)
    caption += "".join(f" {text}" for text in (settings, limit) if text)
    rules = [i for i in range(1, len(summary)) if summary["kind"].iloc[i] != summary["kind"].iloc[i - 1]]
    return format_table(summary, metrics=METRICS, row_label_cols={"Row": "Method", "Param": sweep.symbol}, fmt=fmt,
                        ranked=summary["ranked"].tolist(),
                        caption=caption, label=f"tab:{sweep.table}" if latex else None, rules_before=rules,
                        extra_cols=extra)


def _curve(part: pd.DataFrame, metric: str, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    part = part[part[f"{metric}.n"] > 0].sort_values("value")
    return (part["value"].to_numpy(dtype=float), part[f"{metric}.mean"].to_numpy(dtype=float) * scale,
            part[f"{metric}.std"].to_numpy(dtype=float) * scale)


def plot_sensitivity(df: pd.DataFrame, out_dir: str | Path, sweep: Sweep = ALPHA) -> dict[str, Path]:
    """The figure: each metric against the parameter, TVKD and its control, DPO as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    summary = sensitivity_summary(df, sweep)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(9.6, 3.8))
    for ax, (metric, spec) in zip(np.atleast_1d(axes), METRICS.items()):
        scale = 100.0 if spec.percent else 1.0
        ref = summary[summary["kind"] == "dpo"].iloc[0]
        if ref[f"{metric}.n"] > 0:
            mean, std = ref[f"{metric}.mean"] * scale, ref[f"{metric}.std"] * scale
            ax.axhline(mean, color="0.35", lw=1.2, ls="-", label="DPO (mean ± std)", zorder=1)
            ax.axhspan(mean - std, mean + std, color="0.85", zorder=0)
        for kind, style in (("tvkd", dict(color="C0", marker="o", ls="-", label="TVKD (soft_value)")),
                            ("shuffled", dict(color="C1", marker="s", ls="--", label="TVKD, shuffled Ψ (control)"))):
            x, y, err = _curve(summary[summary["kind"] == kind], metric, scale)
            if len(x):
                ax.errorbar(x, y, yerr=err, capsize=3, zorder=2, **style)
        values = sorted(v for v in summary["value"] if v is not None and not math.isnan(v))
        if values:
            ax.set_xscale("log")
            ax.set_xticks(values)
            ax.set_xticklabels([_number(v) for v in values])
            ax.minorticks_off()
        ax.set_xlabel(sweep.symbol)
        ax.set_ylabel(spec.label + " ↑")
    n = sorted({int(v) for v in summary["n"] if v})
    counts = f"{n[0]}" if len(n) == 1 else "–".join(map(str, (n[0], n[-1]))) if n else "0"
    fig.suptitle(f"Sensitivity to the {sweep.title}: mean ± std over {counts} seed(s)", fontsize=10)
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    if handles:
        np.atleast_1d(axes)[0].legend(handles, labels, fontsize=8, loc="best")
    fig.tight_layout()
    try:
        return save_figure(fig, Path(out_dir) / sweep.table)
    finally:
        plt.close(fig)


def write_sensitivity(df: pd.DataFrame, out_dir: str | Path, sweep: Sweep = ALPHA) -> dict[str, Path]:
    """Write ``<table>.md``, ``<table>.tex``, ``<table>.png`` and ``<table>.pdf`` into ``out_dir``."""
    paths = write_table_files(out_dir, sweep.table, "reports/sensitivity.py",
                              lambda fmt: format_sensitivity(df, fmt, sweep))
    paths.update(plot_sensitivity(df, Path(out_dir), sweep))
    return paths


def _outputs(sweep: Sweep) -> Sequence[str]:
    return tuple(f"{sweep.table}.{ext}" for ext in ("md", "tex", "png", "pdf"))


_COLUMNS = ("method", "control", "seed", *METRICS, *map(items_column, METRICS))


@TABLES.register(ALPHA.table, study=ALPHA.study, paper=ALPHA.paper, outputs=_outputs(ALPHA),
                 columns=(ALPHA.axis, *_COLUMNS))
def write_alpha_sensitivity(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Figure 4a: the table and figure of the α sweep."""
    return write_sensitivity(df, out_dir, ALPHA)


@TABLES.register(BETA.table, study=BETA.study, paper=BETA.paper, outputs=_outputs(BETA),
                 columns=(BETA.axis, *_COLUMNS))
def write_beta_sensitivity(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Figure 4b: the table and figure of the β_V sweep."""
    return write_sensitivity(df, out_dir, BETA)
