"""The teacher-signal dial: how good must a teacher's signal be before it helps a student?

Input: the study frame of `studies/teacher_signal_dial.yaml`, one row per run with `label` (``dpo``,
``dpo-oracle-labels`` (the ceiling control), ``rho=<ρ>``, or an aux reward's name), `seed`, the metrics `oracle_score`, `margin_accuracy` and
`teacher_signal/oracle_gap_correlation` (the measured Spearman correlation of the run's pair offsets with
the oracle gap), and the per-item columns `items.oracle_score` / `items.margin_accuracy`.

Output: `teacher_signal_dial.md` / `.tex` (per row: the offsets' measured correlation with the oracle gap,
and the paired gains over DPO with 95% crossed seed × item intervals, `reports.effects`) and the figure
`teacher_signal_dial.png` / `.pdf`: the oracle-score gain over DPO against the measured correlation, the
dial's points joined by a line, each of the six aux rewards placed on the same axes at its own measured
correlation, and the ceiling control's gain (DPO on oracle-relabelled pairs) as a band: the room a teacher has.
"""

from __future__ import annotations

import math
import re
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
from reports.settings import CONFIG, SETTINGS, describe, settings_sentence
from reports.tables import TABLES, MetricSpec, format_table, summarize, write_table_files
from tvkd.aux_rewards import TABLE5

STUDY = "teacher-signal-dial"
REFERENCE = "dpo"
#: The ceiling control's label: DPO on the same pairs with every label set by the oracle.
CEILING = "dpo-oracle-labels"
CORRELATION = "teacher_signal/oracle_gap_correlation"
EFFECTS = {
    "oracle_score": MetricSpec("Oracle score", higher_is_better=True, digits=3),
    "margin_accuracy": MetricSpec("Margin accuracy (%)", higher_is_better=True, digits=1, percent=True),
}
METRICS = {
    CORRELATION: MetricSpec("ρ(offset, oracle gap)", higher_is_better=True, digits=2),
    "oracle_score": EFFECTS["oracle_score"],
}
_RHO = re.compile(r"^rho=([0-9.]+)$")


def _rows(df: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """(row keys in order, their display names, their kinds: reference | dial | aux)."""
    labels = list(dict.fromkeys(df["label"]))
    dial = sorted((lab for lab in labels if _RHO.match(lab)), key=lambda lab: -float(_RHO.match(lab).group(1)))
    aux = [a for a in TABLE5 if a in labels]
    keys = ([REFERENCE] if REFERENCE in labels else []) + ([CEILING] if CEILING in labels else []) + dial + aux
    names = ["DPO" if k == REFERENCE else "DPO on oracle labels (ceiling)" if k == CEILING
             else f"dial ρ = {float(_RHO.match(k).group(1)):.2f}" if _RHO.match(k) else f"aux {k}" for k in keys]
    kinds = ["reference" if k == REFERENCE else "ceiling" if k == CEILING else "dial" if _RHO.match(k) else "aux"
             for k in keys]
    return keys, names, kinds


def dial_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per table row: key, Name, kind, n, the mean ± std metrics, and per effect metric the
    paired effect against DPO (`<metric>.effect`: a `reports.effects.Effect` or None)."""
    keys, names, kinds = _rows(df)
    df = df[df["label"].isin(keys)].copy()
    for metric in METRICS:
        if metric not in df.columns:
            df[metric] = math.nan
    summary = summarize(df, by=["label"], metrics=list(METRICS)).set_index("label").reindex(keys).reset_index()
    summary["Name"] = names
    summary["kind"] = kinds
    summary["n"] = summary["n"].fillna(0).astype(int)
    effects = effects_by_row(df, "label", keys, REFERENCE, EFFECTS, table="teacher_signal_dial")
    for metric in EFFECTS:
        summary[f"{metric}.effect"] = effects[metric]
    return summary


def format_dial(df: pd.DataFrame, fmt: str = "markdown") -> str:
    summary = dial_summary(df)
    effects = {m: list(summary[f"{m}.effect"]) for m in EFFECTS}
    extra = {}
    for metric, spec in EFFECTS.items():
        header = effect_header(metric, "DPO", spec)
        summary[header] = effect_cells(effects[metric], spec, summary["n"])
        extra[header] = header
    seeds = sorted(set(df["seed"])) if "seed" in df.columns else []
    rows = _caption_rows(df)
    # the offsets' scaling is a setting of the rows with offsets: the two DPO rows (plain, ceiling) have none
    labels = df["label"] if "label" in df.columns else [None] * len(df)
    norm = describe(df, CONFIG + "loss.offset_norm",
                    [None if label in (REFERENCE, CEILING) else row for row, label in zip(rows, labels)], "offset_norm")
    settings = settings_sentence(df, rows, SETTINGS)
    caption = (
        "The teacher-signal dial: TVKD trained with the oracle's own score gaps as pair offsets (ρ = 1: a perfect "
        "teacher, the positive control), with a fraction 1 − ρ of the pairs' offsets permuted among themselves "
        "(ρ = 0: the shuffled negative control), and with each of the six aux rewards of Table 5, beside the ceiling "
        "control (DPO on the same pairs relabelled by the oracle: noise-free preferences)"
        + (f"; {norm} (std: the offsets scaled to unit spread; none: as they are)".replace(") (", "; ")
           if norm else "")
        + ". ρ(offset, oracle gap): the measured Spearman correlation of the run's offsets with the oracle gap. "
        + effects_caption("DPO")
        + f" Seeds {', '.join(map(str, seeds))}."
        + (f" {settings}" if settings else "")
    )
    limit = detection_limit_sentence(effects, EFFECTS)
    if limit:
        caption += " " + limit
    return format_table(summary, metrics=METRICS, row_label_cols={"Name": "Row"}, fmt=fmt, highlight=False,
                        extra_cols=extra, caption=caption, label="tab:teacher-signal-dial")


def _caption_rows(df: pd.DataFrame) -> list[str | None]:
    """Per run, the name its settings go by in the caption: "dial rows" for every ρ, else its row's name."""
    if "label" not in df.columns:
        return [None] * len(df)
    keys, names, kinds = _rows(df)
    group = {"dial": "dial rows"}  # one setting for every ρ; any other row by its own name
    by_key = {k: group.get(kind, name) for k, name, kind in zip(keys, names, kinds)}
    return [by_key.get(v) for v in df["label"]]


def plot_dial(df: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """The figure: oracle-score gain over DPO (95% CI) against the offsets' measured correlation."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    summary = dial_summary(df)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
    ceiling = summary[(summary["kind"] == "ceiling") & summary["oracle_score.effect"].notna()]
    if not ceiling.empty:  # the room a teacher has: DPO on noise-free labels, as a band across the axis
        effect = ceiling["oracle_score.effect"].iloc[0]
        ax.axhspan(effect.low, effect.high, color="C2", alpha=0.15, lw=0, zorder=0)
        ax.axhline(effect.estimate, color="C2", lw=1.0, ls="--", zorder=0,
                   label="ceiling: DPO on oracle labels (95% CI)")
    for kind, style in (("dial", dict(color="C0", marker="o", ls="-", label="dial: oracle offsets, (1−ρ) shuffled")),
                        ("aux", dict(color="C3", marker="s", ls="none", label="aux rewards of Table 5"))):
        part = summary[(summary["kind"] == kind) & summary["oracle_score.effect"].notna()]
        if part.empty:
            continue
        x = part[f"{CORRELATION}.mean"].to_numpy(dtype=float)
        effects = list(part["oracle_score.effect"])
        y = np.array([e.estimate for e in effects])
        err = np.array([[e.estimate - e.low for e in effects], [e.high - e.estimate for e in effects]])
        order = np.argsort(x)
        ax.errorbar(x[order], y[order], yerr=err[:, order], capsize=3, **style)
        if kind == "aux":  # labels alternate above and below, so neighbours at one ρ stay readable
            names = list(part["label"])
            for i, j in enumerate(order):
                ax.annotate(names[j], (x[j], y[j]), textcoords="offset points", fontsize=8, color="C3",
                            xytext=(6, 6 if i % 2 == 0 else -12))
    ax.set_xlabel("rank correlation of the offsets with the oracle gap (Spearman ρ)")
    ax.set_ylabel("oracle-score gain over DPO (95% CI)")
    ax.set_title("How good must a teacher's signal be before it helps the student?", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"png": out_dir / "teacher_signal_dial.png", "pdf": out_dir / "teacher_signal_dial.pdf"}
    fig.savefig(paths["png"], dpi=150)
    fig.savefig(paths["pdf"])
    plt.close(fig)
    return paths


@TABLES.register(
    "teacher_signal_dial", study=STUDY, paper="(no table: the positive control and the dial)",
    outputs=("teacher_signal_dial.md", "teacher_signal_dial.tex", "teacher_signal_dial.png",
             "teacher_signal_dial.pdf"),
    columns=("label", "seed", *METRICS, *map(items_column, EFFECTS)),
)
def write_teacher_signal_dial(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write the dial's table (Markdown, LaTeX) and figure (PNG, PDF) into `out_dir`."""
    paths = write_table_files(out_dir, "teacher_signal_dial", "reports/teacher_signal_dial.py",
                              lambda fmt: format_dial(df, fmt))
    paths.update(plot_dial(df, out_dir))
    return paths
