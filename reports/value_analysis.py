"""The value-analysis table (the paper's Table 3): the teacher's margin accuracy on held-out pairs, by score.

Input: one row per finished run (the `value-analysis` study's frame) with the columns

    teacher                 "dpo" (the DPO teacher) or "sft" (the SFT teacher: the control)
    aux                     the aux reward whose shaping sum Ψ the run's teacher scores hold
    testbed.seed            the testbed's seed (the teacher's); without it, ``seed`` is used
    teacher_scores/sum_logprob, teacher_scores/mean_logprob, teacher_scores/shaping
                            the fraction of test pairs the teacher ranks as labelled by Σ log π_T, by
                            Σ log π_T / |y|, and by Ψ (docs/methods.md §A.6; ties count 1/2)
    teacher_scores/oracle_sum_logprob, .../oracle_mean_logprob, .../oracle_shaping
                            the same against the oracle's preference (the truth) instead of the label

Rows: "Log prob." (Σ log π_T, the DPO-style score), "Log prob. with LC" (length-normalised, SimPO-style),
"Shaping term Ψ (ours)" (soft_value), then Ψ of each other aux reward of Table 5. The two log-prob
rows do not depend on the aux reward, so they are read once per (teacher, seed) from the first run that
has them. Columns: the DPO teacher's accuracy against the labels and against the oracle, the same for
the SFT teacher (the control: what the teacher's DPO stage adds), and the paired difference DPO − SFT
teacher per seed (averaged, with a 95% t-interval over the seeds, reports/effects.py). Each cell is
mean ± std over the testbed seeds, with the seed count.
"""

from __future__ import annotations

import math
import numbers
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from reports.effects import Effect, crossed_effect, format_effect
from reports.settings import CONFIG, VALUE_TEMPERATURE, describe
from reports.tables import MISSING, TABLES, MetricSpec, format_table, summarize, write_table_files
from tvkd.aux_rewards import TABLE5

__all__ = ["METRICS", "format_value_analysis", "value_analysis_long", "value_analysis_summary",
           "write_value_analysis"]

STUDY = "value-analysis"
TEACHERS = {"dpo": "DPO teacher", "sft": "SFT teacher (control)"}
TRUTHS = {"label": "vs labels", "oracle": "vs oracle"}
#: The score rows: key -> (name, the paper's reward formulation, the metric suffix in teacher_scores/).
SCORES: dict[str, tuple[str, str, str]] = {
    "sum_logprob": ("Log prob. Σ log π_T", "DPO", "sum_logprob"),
    "mean_logprob": ("Log prob. with LC Σ log π_T / |y|", "SimPO", "mean_logprob"),
}
OURS = "soft_value"
METRICS: dict[str, MetricSpec] = {
    f"{t}.{k}": MetricSpec(f"{TEACHERS[t]} {TRUTHS[k]} (%)", higher_is_better=True, digits=1, percent=True)
    for t in TEACHERS for k in TRUTHS
}
_PREFIX = "teacher_scores/"


def _text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    return None if text in ("", "none", "null", "nan") else text


def _seed(value: object) -> object:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    return value


def _row_keys(auxes: set[str]) -> list[str]:
    shaping = [OURS] + [a for a in TABLE5 if a != OURS] + sorted(a for a in auxes if a not in TABLE5)
    return list(SCORES) + [f"shaping:{a}" for a in shaping if a in auxes or a == OURS]


def _row_name(key: str) -> tuple[str, str]:
    """(Score, Formulation) of a row key."""
    if key in SCORES:
        return SCORES[key][0], SCORES[key][1]
    aux = key.split(":", 1)[1]
    return (f"Shaping term Ψ, {aux}", "Ours") if aux == OURS else (f"Shaping term Ψ, {aux}", "TVKD, other aux")


def _metric(run: pd.Series, name: str) -> float:
    value = run.get(_PREFIX + name, math.nan)
    return math.nan if value is None else float(value)


def value_analysis_long(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (score row, teacher, seed): key, teacher, seed, label, oracle (accuracies in [0, 1])."""
    absent = [c for c in ("teacher", "aux") if c not in df.columns]
    if absent:
        raise KeyError(f"value_analysis: columns {absent} are missing; the frame has {list(df.columns)}")
    seed_col = "testbed.seed" if "testbed.seed" in df.columns else "seed"
    if seed_col not in df.columns:
        raise KeyError("value_analysis: neither 'testbed.seed' nor 'seed' is a column of the frame")
    records, seen = [], set()
    stray = 0
    for _, run in df.iterrows():
        teacher, aux, seed = _text(run["teacher"]), _text(run["aux"]), _seed(run[seed_col])
        if teacher not in TEACHERS or aux is None:
            stray += 1
            continue

        entries = [(f"shaping:{aux}", "shaping")]
        if (teacher, seed) not in seen:  # the log-prob rows do not depend on the aux: read them once
            seen.add((teacher, seed))
            entries += [(key, SCORES[key][2]) for key in SCORES]
        for key, name in entries:
            records.append({"key": key, "teacher": teacher, "seed": seed, "label": _metric(run, name),
                            "oracle": _metric(run, f"oracle_{name}")})
    if stray:
        warnings.warn(f"value_analysis: {stray} runs have no teacher in {sorted(TEACHERS)} or no aux and are not "
                      "shown", stacklevel=2)
    long = pd.DataFrame(records, columns=["key", "teacher", "seed", "label", "oracle"])
    duplicated = long[long.duplicated(["key", "teacher", "seed"], keep=False)]
    if len(duplicated):
        where = sorted({(k, t, s) for k, t, s in zip(duplicated["key"], duplicated["teacher"], duplicated["seed"])},
                       key=str)
        raise ValueError(f"value_analysis: several runs for one (score, teacher, seed): {where}; filter the frame "
                         "to one configuration per seed")
    return long


def _difference(wide: pd.DataFrame, key: str, truth: str) -> Effect | None:
    part = wide[wide["key"] == key]
    diffs = [np.array([a - b]) for a, b in zip(part[f"dpo.{truth}"], part[f"sft.{truth}"])
             if not (math.isnan(a) or math.isnan(b))]
    return crossed_effect(diffs) if diffs else None


def value_analysis_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per score row, in table order: key, Score, Formulation, n (seeds), the mean ± std columns
    of `METRICS`, and ``effect.<truth>`` (DPO − SFT teacher, an `Effect` or None)."""
    long = value_analysis_long(df)
    wide = long.pivot_table(index=["key", "seed"], columns="teacher", values=["label", "oracle"], aggfunc="first",
                            dropna=False)
    wide.columns = [f"{teacher}.{truth}" for truth, teacher in wide.columns]
    wide = wide.reset_index()
    for metric in METRICS:
        if metric not in wide.columns:
            wide[metric] = math.nan
    auxes = {k.split(":", 1)[1] for k in long["key"] if k.startswith("shaping:")}
    keys = _row_keys(auxes)
    summary = summarize(wide, by=["key"], metrics=list(METRICS)).set_index("key").reindex(keys).reset_index()
    summary["Score"] = [_row_name(k)[0] for k in keys]
    summary["Formulation"] = [_row_name(k)[1] for k in keys]
    counts = ["n"] + [f"{m}.n" for m in METRICS]
    summary[counts] = summary[counts].fillna(0).astype(int)
    for truth in TRUTHS:
        summary[f"effect.{truth}"] = pd.Series([_difference(wide, k, truth) for k in keys], index=summary.index,
                                               dtype="object")
    return summary


def format_value_analysis(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """The table as Markdown or LaTeX text (with its caption)."""
    summary = value_analysis_summary(df)
    latex = fmt == "latex"
    spec = MetricSpec("", digits=1, percent=True)
    extra = {}
    for truth, words in TRUTHS.items():
        column = f"Δ.{truth}"
        summary[column] = [format_effect(e, spec) if e is not None else MISSING for e in summary[f"effect.{truth}"]]
        extra[column] = f"Δ DPO − SFT teacher {words} (pts) [95% CI, seeds]"
    long = value_analysis_long(df)
    seeds = sorted({s for s in long["seed"]}, key=str)
    second = "underlined" if latex else "italic"
    caption = (
        "The teacher's margin accuracy on the held-out preference pairs by score (the paper's Table 3): the "
        "sequence log-prob (DPO's implicit reward), its length-normalised form (SimPO's), and the shaping sum Ψ "
        f"of the TVKD signal (ours: soft_value{_signal_settings(df)}; then Ψ of each other aux reward). Accuracy "
        "against the pair's (noisy) label and against the oracle's preference; chance is 50%, ties count 1/2. "
        "The SFT teacher (before its DPO stage) is the control. "
        f"Mean ± std over testbed seeds {', '.join(map(str, seeds)) or '(none)'} (each a whole testbed build); "
        f"n = seeds. Bold: best, {second}: second best per column. Δ: the DPO teacher minus the SFT teacher on "
        "the same seed, averaged, with a 95% t-interval over the seeds (df = seeds − 1), in percentage points."
    )
    rules = [i for i, k in enumerate(summary["key"]) if k == f"shaping:{OURS}" or
             (i > 0 and summary["key"].iloc[i - 1] == f"shaping:{OURS}")]
    return format_table(summary, metrics=METRICS, row_label_cols=["Score", "Formulation"], fmt=fmt,
                        caption=caption, label="tab:value_analysis" if latex else None, rules_before=rules,
                        extra_cols=extra)


def _signal_settings(df: pd.DataFrame) -> str:
    """", β_V 2, shaping pbrs, γ 1" as the runs' configs give the signal (β_V of the soft_value runs; the shaping
    and γ of every aux's runs, named per row where they differ), or "" when the frame has none of them."""
    auxes = [_text(a) for a in df["aux"]] if "aux" in df.columns else [None] * len(df)
    ours = [OURS if a == OURS else None for a in auxes]
    parts = [describe(df, VALUE_TEMPERATURE, ours, "β_V"),
             describe(df, CONFIG + "loss.shaping", auxes, "shaping"), describe(df, CONFIG + "loss.gamma", auxes, "γ")]
    return "".join(f", {p}" for p in parts if p)


@TABLES.register("value_analysis", study=STUDY, paper="Table 3",
                 outputs=("value_analysis.md", "value_analysis.tex"),
                 columns=("teacher", "aux", "testbed.seed", *(f"{_PREFIX}{p}{n}" for p in ("", "oracle_")
                                                              for n in ("sum_logprob", "mean_logprob", "shaping"))))
def write_value_analysis(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``value_analysis.md`` and ``value_analysis.tex`` into ``out_dir``."""
    paths = write_table_files(out_dir, "value_analysis", "reports/value_analysis.py",
                              lambda fmt: format_value_analysis(df, fmt))
    return paths
