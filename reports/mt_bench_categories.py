"""MT-Bench per category (the paper's Figures 2 and 3): a table and a radar of each method's category scores.

Input: one row per finished run (the `mt-bench-categories` study's frame) with the columns

    label                       the study variant: sft, dpo, tvkd, tvkd-shuffled (others are shown after them)
    seed
    mt_bench/category/<c>       the judge's mean rating (1-10) of the run's answers in category <c>, both turns
                                (tvkd/benchmarks/mt_bench.py; merged into the run's metrics by ``tvkd eval``)
    mt_bench/score              the mean over every judged turn

Categories are MT-Bench's eight in FastChat's order when present, then any other category found (on the
testbed: its tasks sort, reverse, dedupe, count, judged by the testbed oracle through the loopback judge).
Table: rows = methods, one column per category and the overall score (mean ± std over seeds), and the
paired difference in overall score to DPO of the same seed (averaged over seeds, with a 95% t-interval over the seeds:
the store keeps one score per run). Only the trained methods are ranked. The radar (PNG and PDF,
byte-identical for the same frame) draws each method's mean category scores on one polar axis per category.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from reports.effects import Effect, crossed_effect, format_effect
from reports.figures import save_figure
from reports.settings import settings_sentence
from reports.tables import (
    MISSING,
    TABLES,
    MetricSpec,
    format_seeds,
    format_table,
    summarize,
    write_table_files,
)
from tvkd.testbed.tasks import TASKS

__all__ = ["categories", "format_mt_bench_categories", "mt_bench_summary", "plot_radar", "write_mt_bench_categories"]

STUDY = "mt-bench-categories"
REFERENCE = "dpo"
PREFIX = "mt_bench/category/"
SCORE = "mt_bench/score"
#: MT-Bench's categories in FastChat's question order.
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
#: Known rows: label -> (name, ranked).
METHODS: dict[str, tuple[str, bool]] = {
    "sft": ("SFT student (start)", False),
    "dpo": ("DPO", True),
    "tvkd": ("TVKD (ours)", True),
    "tvkd-shuffled": ("TVKD, shuffled Ψ (control)", False),
}


def categories(df: pd.DataFrame) -> list[str]:
    """The categories the frame has scores for: MT-Bench's in order, the testbed's tasks in order, then the
    others in column order."""
    known = (*MT_BENCH, *TASKS)
    found = [c[len(PREFIX):] for c in df.columns if c.startswith(PREFIX)]
    return [c for c in known if c in found] + [c for c in found if c not in known]


def _rows(df: pd.DataFrame) -> list[str]:
    labels = [str(v) for v in dict.fromkeys(df["label"])]
    return [k for k in METHODS if k in labels] + [k for k in labels if k not in METHODS]


def _seed_effect(df: pd.DataFrame, label: str) -> Effect | None:
    if label == REFERENCE or SCORE not in df.columns:
        return None
    ref = {s: v for s, v in zip(df.loc[df["label"] == REFERENCE, "seed"], df.loc[df["label"] == REFERENCE, SCORE])
           if v is not None and not math.isnan(float(v))}
    part = df[df["label"] == label]
    diffs = [np.array([float(v) - ref[s]]) for s, v in zip(part["seed"], part[SCORE])
             if s in ref and v is not None and not math.isnan(float(v))]
    return crossed_effect(diffs) if diffs else None


def mt_bench_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method: label, Method, ranked, n, the mean ± std columns of every category and the score,
    and ``effect`` (the seed-paired difference in overall score to DPO, an `Effect` or None)."""
    absent = [c for c in ("label", "seed") if c not in df.columns]
    if absent:
        raise KeyError(f"mt_bench_categories: columns {absent} are missing; the frame has {list(df.columns)}")
    cats = categories(df)
    if not cats:
        warnings.warn("mt_bench_categories: no mt_bench/category/* column: run the MT-Bench benchmark on the study's "
                      "runs first (python -m studies.mt_bench_categories, or tvkd eval <run> --bench mt-bench)",
                      stacklevel=2)
    df = df.copy()
    if SCORE not in df.columns:
        df[SCORE] = math.nan
    duplicated = df[df.duplicated(["label", "seed"], keep=False)]
    if len(duplicated):
        where = sorted({(k, s) for k, s in zip(duplicated["label"], duplicated["seed"])}, key=str)
        raise ValueError(f"mt_bench_categories: several runs for one (row, seed): {where}")
    metrics = [PREFIX + c for c in cats] + [SCORE]
    keys = _rows(df)
    summary = summarize(df, by=["label"], metrics=metrics).set_index("label").reindex(keys).reset_index()
    summary["Method"] = [METHODS.get(k, (k, True))[0] for k in keys]
    summary["ranked"] = [METHODS.get(k, (k, True))[1] for k in keys]
    counts = ["n"] + [f"{m}.n" for m in metrics]
    summary[counts] = summary[counts].fillna(0).astype(int)
    summary["effect"] = pd.Series([_seed_effect(df, k) for k in keys], index=summary.index, dtype="object")
    return summary


def format_mt_bench_categories(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """The table as Markdown or LaTeX text (with its caption)."""
    summary = mt_bench_summary(df)
    cats = categories(df)
    metrics = {PREFIX + c: MetricSpec(c, higher_is_better=True, digits=2) for c in cats}
    metrics[SCORE] = MetricSpec("MT-Bench", higher_is_better=True, digits=2)
    spec = MetricSpec("", digits=2)
    summary["Δ"] = [format_effect(e, spec) if e is not None else MISSING for e in summary["effect"]]
    second = "underlined" if fmt == "latex" else "italic"
    caption = (
        "MT-Bench per category (the paper's Figures 2 and 3): the judge's mean rating (1-10) of each method's answers "
        "in each category, both turns, and overall; FastChat's questions format, judge prompts and [[rating]] parsing "
        "(tvkd/benchmarks/mt_bench.py). On the testbed the categories are its tasks and the judge is the loopback "
        "judge backed by the oracle (rating = round(1 + 9 r*)). "
        f"Mean ± std over seeds {format_seeds(df['seed'])}; n = runs per row. Bold: best, {second}: second best among DPO and "
        "TVKD. Δ MT-Bench vs DPO: the per-seed difference in overall score, averaged, with a 95% t-interval over the "
        "seeds (df = seeds − 1)."
    )
    if "label" in df.columns:
        settings = settings_sentence(df, [METHODS.get(str(k), (str(k), True))[0] for k in df["label"]])
        caption += f" {settings}" if settings else ""
    stand_in = df.get("mt_bench/stand_in_judge", pd.Series(dtype=object)).dropna()
    if len(stand_in):  # a hash, not a judgement: the table must not read as a score
        caption = (f"WARNING: {len(stand_in)} of {len(df)} runs were rated by a stand-in judge, not a model "
                   f"({stand_in.iloc[0]}); their numbers measure nothing about the answers. " + caption)
    return format_table(summary, metrics=metrics, row_label_cols={"Method": "Method"}, fmt=fmt,
                        ranked=summary["ranked"].tolist(), caption=caption,
                        label="tab:mt_bench_categories" if fmt == "latex" else None,
                        extra_cols={"Δ": "Δ MT-Bench vs DPO [95% CI, seeds]"})


def plot_radar(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """The radar: one polar axis per category, one closed polygon per method (its mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    summary = mt_bench_summary(df)
    cats = categories(df)
    fig = plt.figure(figsize=(5.6, 5.2))
    ax = fig.add_subplot(projection="polar")
    if cats:
        angles = np.linspace(0, 2 * np.pi, len(cats), endpoint=False)
        closed = np.concatenate([angles, angles[:1]])
        styles = ["-", "--", "-.", ":"]
        for i, row in summary.iterrows():
            values = np.array([row[f"{PREFIX}{c}.mean"] for c in cats], dtype=float)
            if np.isnan(values).all():
                continue
            ax.plot(closed, np.concatenate([values, values[:1]]), ls=styles[i % len(styles)], marker="o", ms=3,
                    color=f"C{i}", label=f"{row['Method']} ({row[f'{SCORE}.mean']:.2f})")
            ax.fill(closed, np.concatenate([values, values[:1]]), color=f"C{i}", alpha=0.06)
        ax.set_xticks(angles)
        ax.set_xticklabels(cats)
        ax.set_ylim(1, 10)
        ax.set_yticks([2, 4, 6, 8, 10])
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.32, 1.12))
    ax.set_title(f"MT-Bench per category (1-10), mean over seeds {format_seeds(df['seed'])}", fontsize=10, pad=18)
    fig.tight_layout()
    try:
        return save_figure(fig, Path(out_dir) / "mt_bench_categories")
    finally:
        plt.close(fig)


@TABLES.register("mt_bench_categories", study=STUDY, paper="Figures 2, 3",
                 outputs=("mt_bench_categories.md", "mt_bench_categories.tex", "mt_bench_categories.png",
                          "mt_bench_categories.pdf"),
                 columns=("label", "seed", SCORE, PREFIX + "<category>"))
def write_mt_bench_categories(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write the table (Markdown, LaTeX) and the radar (PNG, PDF) into ``out_dir``."""
    paths = write_table_files(out_dir, "mt_bench_categories", "reports/mt_bench_categories.py",
                              lambda fmt: format_mt_bench_categories(df, fmt))
    paths.update(plot_radar(df, out_dir))
    return paths
