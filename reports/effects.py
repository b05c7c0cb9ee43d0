"""Paired effect sizes with 95% intervals: how much a table row differs from a reference row (DPO).

The study frame carries, per run, the per-item results behind two of its metrics:

    items.oracle_score      {prompt: oracle score of the run's greedy answer}   (matched by prompt)
    items.margin_accuracy   [outcome per test pair, in {0, 0.5, 1}]             (matched by position;
                            every run of a study scores the same pairs in the same order)

For a row R and the reference row, take each seed s where both have a run and form the per-item
differences d_s = item_R − item_ref (prompts both scored; positions where both have a value). The
effect is the mean over seeds of mean(d_s): each seed counts once, however many items it has.

The interval comes from a *hierarchical* bootstrap (`hierarchical_bootstrap`): a replicate draws
the seeds with replacement and, within each drawn seed, its items with replacement, and averages as
the estimate does; the 95% interval is the 2.5 and 97.5 percentiles of B = 2000 replicates and the
standard error their standard deviation. The generator has a fixed seed, so a table is reproducible.

Why the seeds are resampled too: a seed fixes the training subsample, the initialisation and the
data order, so two runs of one method differ by far more than the evaluation items can tell —
training noise is the dominant source of variation. Resampling the items alone would only cover the
evaluation noise (which prompts/pairs happened to be in the test set) and give intervals that are too
narrow to say anything about whether a method is better. Resampling the seeds makes the interval
about "another training run", which is what a method comparison claims.

What that means with 3 seeds: a seed-level bootstrap sees only the 10 distinct multisets of 3
seeds, so the interval is coarse (its ends move in jumps), and it is somewhat narrow: the bootstrap
variance of a mean of S values is (S − 1)/S of the plug-in estimate (2/3 at S = 3), and the
percentiles ignore the extra width a t quantile would add for so few values. Resampling the items
inside each seed adds back part of that width (the evaluation noise is counted once more). Read the
intervals as a guide — an interval that excludes 0 by a wide margin is a real difference, one that
barely does is not established — and add seeds for a claim that rests on a small effect. With one
paired seed the interval covers the evaluation noise only.

`minimal_detectable_effect` turns a standard error into the smallest true difference that a
two-sided test at the 5% level would detect with 80% power: (z_0.975 + z_0.8) · SE ≈ 2.80 · SE.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist, median
from typing import Any

import numpy as np
import pandas as pd

from reports.tables import MISSING, MetricSpec

__all__ = [
    "BOOTSTRAP_SEED", "EFFECT_METRICS", "N_BOOT", "Effect", "detection_limit_sentence", "effect_cells",
    "effect_header", "effects_by_row", "effects_caption", "format_effect", "hierarchical_bootstrap", "items_column",
    "minimal_detectable_effect", "paired_differences", "paired_effect",
]

#: Bootstrap replicates and the generator seed (fixed: the same frame gives the same table).
N_BOOT = 2000
BOOTSTRAP_SEED = 0
#: Metrics with per-item results in the study frame -> (short name for a column header, name in prose).
EFFECT_METRICS: dict[str, tuple[str, str]] = {
    "oracle_score": ("oracle", "oracle score"),
    "margin_accuracy": ("margin acc.", "margin accuracy"),
}
#: Items per bootstrap block: bounds the memory of one seed's resampling (draws × items indices).
_BLOCK = 4_000_000


def items_column(metric: str) -> str:
    """The study-frame column with the per-item results behind ``metric``."""
    return f"items.{metric}"


@dataclass(frozen=True)
class Effect:
    """A paired difference row − reference: the estimate, its 95% bootstrap interval and standard error,
    the seeds it rests on and the paired items over all of them."""

    estimate: float
    low: float
    high: float
    se: float
    n_seeds: int
    n_items: int


# --------------------------------------------------------------------------------------------
# Pairing and the bootstrap
# --------------------------------------------------------------------------------------------


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, numbers.Real):
        return math.isnan(float(value))
    return False


def _pairs(row: Any, ref: Any, where: str) -> np.ndarray | None:
    """The per-item differences of one seed, or None when the two runs share no item.

    Mappings are matched by key (prompt), sequences by position; an item missing on either side
    (absent key, None, NaN) is left out of the pair.
    """
    if _is_missing(row) or _is_missing(ref):
        return None
    if isinstance(row, Mapping) and isinstance(ref, Mapping):
        keys = [k for k in row if k in ref and not _is_missing(row[k]) and not _is_missing(ref[k])]
        mine = [row[k] for k in keys]
        theirs = [ref[k] for k in keys]
    elif isinstance(row, Mapping) or isinstance(ref, Mapping) or isinstance(row, str) or isinstance(ref, str):
        raise TypeError(f"paired effects: {where}: the two runs' items are of different kinds "
                        f"({type(row).__name__} and {type(ref).__name__}); expected two mappings or two sequences")
    else:
        row, ref = list(row), list(ref)
        if len(row) != len(ref):
            warnings.warn(f"paired effects: {where}: {len(row)} items against the reference's {len(ref)}; "
                          f"items matched by position need the same test set, so this seed gives no effect",
                          stacklevel=4)
            return None
        both = [(a, b) for a, b in zip(row, ref) if not _is_missing(a) and not _is_missing(b)]
        mine = [a for a, _ in both]
        theirs = [b for _, b in both]
    if not mine:
        return None
    return np.asarray(mine, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)


def paired_differences(row_items: Mapping[Any, Any], ref_items: Mapping[Any, Any], *,
                       where: str = "row") -> dict[Any, np.ndarray]:
    """Per seed where both have items: the per-item differences row − reference (see `_pairs`)."""
    out = {}
    for seed, items in row_items.items():
        if seed in ref_items:
            d = _pairs(items, ref_items[seed], f"{where}, seed {seed}")
            if d is not None:
                out[seed] = d
    return out


def hierarchical_bootstrap(diffs: Sequence[np.ndarray] | Iterable[np.ndarray], *, n_boot: int = N_BOOT,
                           seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> Effect | None:
    """The estimate (mean over seeds of the mean per-item difference) with its hierarchical-bootstrap
    interval and standard error: each of ``n_boot`` replicates draws the seeds with replacement and,
    within each drawn seed, its items with replacement (a fresh draw each time a seed is drawn).

    ``diffs``: one array of per-item differences per seed. None when no seed has an item.
    """
    diffs = [np.asarray(d, dtype=np.float64).ravel() for d in diffs]
    diffs = [d for d in diffs if d.size]
    if not diffs:
        return None
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    n_seeds = len(diffs)
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    seed_means = np.empty((n_boot, n_seeds))
    for s, d in enumerate(diffs):
        where = drawn == s
        k, n = int(where.sum()), d.size
        means = np.empty(k)
        step = max(1, _BLOCK // n)
        for start in range(0, k, step):
            rows = min(step, k - start)
            means[start:start + rows] = d[rng.integers(0, n, size=(rows, n))].mean(axis=1)
        seed_means[where] = means
    replicates = seed_means.mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Effect(
        estimate=float(np.mean([d.mean() for d in diffs])),
        low=float(low), high=float(high),
        se=float(replicates.std(ddof=1)) if n_boot > 1 else 0.0,
        n_seeds=n_seeds, n_items=int(sum(d.size for d in diffs)),
    )


def paired_effect(row_items: Mapping[Any, Any], ref_items: Mapping[Any, Any], *, n_boot: int = N_BOOT,
                  seed: int = BOOTSTRAP_SEED, where: str = "row") -> Effect | None:
    """The effect row − reference from ``{seed: items}`` of each (None when no seed pairs up)."""
    diffs = paired_differences(row_items, ref_items, where=where)
    return hierarchical_bootstrap([diffs[s] for s in diffs], n_boot=n_boot, seed=seed)


def minimal_detectable_effect(se: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided test at level ``alpha`` detects with probability
    ``power``, given the estimate's standard error: (z_{1−α/2} + z_{power}) · se (≈ 2.80 · se)."""
    z = NormalDist()
    return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * se


# --------------------------------------------------------------------------------------------
# Table support
# --------------------------------------------------------------------------------------------


def effects_by_row(df: pd.DataFrame, row_col: str, rows: Sequence[str], reference: str,
                   metrics: Iterable[str], *, n_boot: int = N_BOOT, seed: int = BOOTSTRAP_SEED,
                   table: str = "table") -> dict[str, list[Effect | None]]:
    """Per metric, per row of ``rows`` (in order): the effect of the row against ``reference``.

    ``df`` holds one run per (row, seed): ``row_col`` names the row, ``seed`` the seed, and
    ``items.<metric>`` the per-item results (NaN/None: that run contributes no effect). The
    reference row itself, rows without items and rows sharing no seed with the reference get None.
    """
    out: dict[str, list[Effect | None]] = {}
    for metric in metrics:
        column = items_column(metric)
        if column not in df.columns:
            out[metric] = [None] * len(rows)
            continue
        per_row: dict[str, dict[Any, Any]] = {}
        for key, s, items in zip(df[row_col], df["seed"], df[column]):
            if not _is_missing(items):
                per_row.setdefault(key, {})[s] = items
        ref_items = per_row.get(reference, {})
        out[metric] = [
            None if key == reference else
            paired_effect(per_row.get(key, {}), ref_items, n_boot=n_boot, seed=seed,
                          where=f"{table}: {column} of row {key!r}")
            for key in rows
        ]
    return out


def _signed(value: float, digits: int) -> str:
    text = f"{value:+.{digits}f}"
    return "+" + text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def format_effect(effect: Effect | None, spec: MetricSpec) -> str:
    """An effect cell: ``+0.012 [+0.004, +0.020]`` with the metric's digits (×100 for a percentage,
    so it reads in percentage points); "–" for no effect."""
    if effect is None:
        return MISSING
    scale = 100 if spec.percent else 1
    est, low, high = (_signed(v * scale, spec.digits) for v in (effect.estimate, effect.low, effect.high))
    return f"{est} [{low}, {high}]"


def effect_header(metric: str, reference_name: str, spec: MetricSpec) -> str:
    """The column header, e.g. "Δ oracle vs DPO [95% CI]" or "Δ margin acc. vs DPO (pts) [95% CI]"."""
    short = EFFECT_METRICS.get(metric, (metric, metric))[0]
    unit = " (pts)" if spec.percent else ""
    return f"Δ {short} vs {reference_name}{unit} [95% CI]"


def effect_cells(effects: Sequence[Effect | None], spec: MetricSpec, runs: Sequence[int]) -> list[str]:
    """The column's cells: `format_effect`, with " (n=k)" when the effect rests on fewer seeds (k)
    than the row has runs, as the mean ± std cells do."""
    cells = []
    for effect, n in zip(effects, runs):
        cell = format_effect(effect, spec)
        if effect is not None and effect.n_seeds != int(n):
            cell += f" (n={effect.n_seeds})"
        cells.append(cell)
    return cells


def detection_limit_sentence(effects: Mapping[str, Sequence[Effect | None]], specs: Mapping[str, MetricSpec],
                             *, alpha: float = 0.05, power: float = 0.8) -> str | None:
    """The caption line giving, per metric, the minimal detectable effect of the median bootstrap SE
    over the rows, e.g. "With 3 seeds, differences smaller than ±0.006 in oracle score and ±1.8 pts in
    margin accuracy are below the detection limit (80% power, 5% level)." None when no row has an effect.
    """
    parts, seeds = [], set()
    for metric, row_effects in effects.items():
        present = [e for e in row_effects if e is not None]
        if not present:
            continue
        spec = specs[metric]
        mde = minimal_detectable_effect(median(e.se for e in present), alpha=alpha, power=power)
        value = f"{mde * (100 if spec.percent else 1):.{spec.digits}f}" + (" pts" if spec.percent else "")
        parts.append(f"±{value} in {EFFECT_METRICS.get(metric, (metric, metric))[1]}")
        seeds.update(e.n_seeds for e in present)
    if not parts:
        return None
    low, high = min(seeds), max(seeds)
    count = f"{low}" if low == high else f"{low}–{high}"
    noun = "seed" if high == 1 else "seeds"
    only = " (evaluation noise only)" if high == 1 else ""
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return (f"With {count} {noun}{only}, differences smaller than {listed} are below the detection limit "
            f"({power:.0%} power, {alpha:.0%} level).")


def effects_caption(reference_name: str) -> str:
    """The caption sentence that explains the Δ columns."""
    return (
        f"Δ vs {reference_name}: the paired difference to {reference_name}'s run of the same seed (per test "
        "prompt for the oracle score; per test pair for margin accuracy, in percentage points), averaged over "
        f"seeds, with a 95% hierarchical-bootstrap interval (seeds, and items within them, resampled; {N_BOOT} "
        "replicates); (n=k): the seeds it rests on, when fewer than the row's runs; – in a Δ column: the "
        "reference row itself, or no per-item results to pair."
    )
