"""Paired effect sizes with 95% intervals: how much a table row differs from a reference row (DPO).

The study frame carries, per run, the per-item results behind two of its metrics:

    items.oracle_score      {prompt: oracle score of the run's greedy answer}   (matched by prompt)
    items.margin_accuracy   [outcome per test pair, in {0, 0.5, 1}]             (matched by position;
                            every run of a study scores the same pairs in the same order)

For a row R and the reference row, take each seed s where both have a run and form the per-item
differences d_si = item_R − item_ref (prompts both scored; positions where both have a value). The
effect is the mean over seeds of mean_i(d_si): each seed counts once, however many items it has.

The default interval (`crossed_effect`) treats seeds and items as *crossed* random effects: every
seed is evaluated on the same test prompts, so

    d_si = μ + a_s + b_i + e_si,   a_s ~ (0, σ_a²) a training run,  b_i ~ (0, σ_b²) a prompt,  e_si residual.

A prompt on which the row beats the reference on one seed tends to on every seed (b_i is shared), so
resampling the items independently within each seed, as a hierarchical bootstrap does, misses σ_b²/I;
and with few seeds, percentiles of a bootstrap over seeds are far too narrow (with 3 seeds it sees
only 10 distinct multisets and a variance (S − 1)/S of the plug-in one). The crossed analysis takes the
two-way ANOVA mean squares of the S × I table (MS_seed, MS_item, MS_resid; Cornfield–Tukey expected
values) and estimates the variance of the grand mean as

    Var = [MS_seed + max(0, MS_item − MS_resid)] / (S·I)   = σ_a²/S + σ_b²/I + σ_e²/(S·I) in expectation,

with Satterthwaite's degrees of freedom for that combination of mean squares and a t quantile. With
no prompt effect it is exactly the t-interval over the S per-seed means (df = S − 1); with a large
one it tends to the prompt-level interval (df → I − 1). The seed term is never truncated: an
MS_seed below MS_resid says little with 2 degrees of freedom. The estimand is the difference over new
training runs *and* new prompts from the same distribution, which is what a method comparison claims.
`tests/test_effects.py` checks the coverage on simulated studies (seed-only, mixed and prompt-dominated
variation at 3, 5 and 10 seeds); the old bootstrap covers 0.75 at 3 seeds where seeds dominate.

Items missing on some seeds: the variance components come from the prompts every seed scored, and the
variance of the estimate (which uses every item) from those components and the actual item counts.
Seeds that share fewer than 2 items: a t-interval over the per-seed means (df = S − 1), which is right
for items drawn independently per seed. One paired seed: a t-interval over its items (df = I − 1), the
evaluation noise only. One seed with one item: no interval.

`hierarchical_bootstrap` stays as an option (``method="bootstrap"``): a replicate draws the seeds with
replacement and, within each drawn seed, its items with replacement; the 2.5 and 97.5 percentiles of
B = 2000 replicates, with a fixed generator seed.

`minimal_detectable_effect` turns a row's standard error and degrees of freedom into the smallest
true difference a two-sided t test at the 5% level detects with 80% power (the noncentral t; with
infinite df it is (z_0.975 + z_0.8) · SE ≈ 2.80 · SE). Each row gets its own (`Effect.mde`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import optimize, stats

from reports.tables import MISSING, MetricSpec

__all__ = [
    "BOOTSTRAP_SEED", "DEFAULT_INTERVAL", "EFFECT_METRICS", "INTERVALS", "N_BOOT", "CrossedFit", "Effect",
    "across_builds_effect", "builds_fixed_effect", "crossed_effect", "crossed_interval", "detection_limit_sentence", "effect_cells", "effect_header",
    "effects_by_row", "effects_caption", "format_effect", "hierarchical_bootstrap", "items_column",
    "minimal_detectable_effect", "paired_differences", "paired_effect", "paired_items",
]

#: Bootstrap replicates and the generator seed (fixed: the same frame gives the same table).
N_BOOT = 2000
BOOTSTRAP_SEED = 0
#: The interval methods: the crossed seed × item model (default) and the hierarchical bootstrap.
INTERVALS = ("crossed", "bootstrap")
DEFAULT_INTERVAL = "crossed"
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
    """A paired difference row − reference: the estimate, its 95% interval and standard error, the
    seeds it rests on, the paired items over all of them, and the degrees of freedom of the interval's
    t quantile (NaN: no interval could be formed; for the bootstrap, seeds − 1, used by `mde` only)."""

    estimate: float
    low: float
    high: float
    se: float
    n_seeds: int
    n_items: int
    df: float = math.inf

    def mde(self, *, alpha: float = 0.05, power: float = 0.8) -> float:
        """The row's minimal detectable effect (`minimal_detectable_effect` of its SE and df)."""
        return minimal_detectable_effect(self.se, alpha=alpha, power=power, df=self.df)


# --------------------------------------------------------------------------------------------
# Pairing
# --------------------------------------------------------------------------------------------


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, numbers.Real):
        return math.isnan(float(value))
    return False


def _item_pairs(row: Any, ref: Any, where: str) -> dict[Any, float] | None:
    """The per-item differences of one seed, keyed by prompt (mappings) or position (sequences), or
    None when the two runs share no item. An item missing on either side (absent key, None, NaN) is left
    out of the pair."""
    if _is_missing(row) or _is_missing(ref):
        return None
    if isinstance(row, Mapping) and isinstance(ref, Mapping):
        keys = [k for k in row if k in ref and not _is_missing(row[k]) and not _is_missing(ref[k])]
        out = {k: float(row[k]) - float(ref[k]) for k in keys}
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
        out = {i: float(a) - float(b) for i, (a, b) in enumerate(zip(row, ref))
               if not _is_missing(a) and not _is_missing(b)}
    return out or None


def paired_items(row_items: Mapping[Any, Any], ref_items: Mapping[Any, Any], *,
                 where: str = "row") -> dict[Any, dict[Any, float]]:
    """Per seed where both have items: ``{item: row − reference}`` (prompt or position -> difference)."""
    out = {}
    for seed, items in row_items.items():
        if seed in ref_items:
            d = _item_pairs(items, ref_items[seed], f"{where}, seed {seed}")
            if d is not None:
                out[seed] = d
    return out


def paired_differences(row_items: Mapping[Any, Any], ref_items: Mapping[Any, Any], *,
                       where: str = "row") -> dict[Any, np.ndarray]:
    """Per seed where both have items: the per-item differences row − reference (`paired_items`, as arrays)."""
    return {s: np.fromiter(d.values(), dtype=np.float64, count=len(d))
            for s, d in paired_items(row_items, ref_items, where=where).items()}


# --------------------------------------------------------------------------------------------
# The crossed seed × item model
# --------------------------------------------------------------------------------------------


class CrossedFit(NamedTuple):
    """`crossed_interval`'s arrays (one entry per study): the estimate, its standard error, the
    Satterthwaite degrees of freedom and the interval's ends."""

    estimate: np.ndarray
    se: np.ndarray
    df: np.ndarray
    low: np.ndarray
    high: np.ndarray


def _mean_squares(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two-way ANOVA mean squares (seeds, items, residual) of complete tables ``d`` (..., S, I)."""
    n_seeds, n_items = d.shape[-2:]
    grand = d.mean(axis=(-2, -1))
    seed_means = d.mean(axis=-1)
    item_means = d.mean(axis=-2)
    ms_seed = n_items * ((seed_means - grand[..., None]) ** 2).sum(axis=-1) / (n_seeds - 1)
    ms_item = n_seeds * ((item_means - grand[..., None]) ** 2).sum(axis=-1) / (n_items - 1)
    resid = d - seed_means[..., None] - item_means[..., None, :] + grand[..., None, None]
    ms_resid = (resid ** 2).sum(axis=(-2, -1)) / ((n_seeds - 1) * (n_items - 1))
    return ms_seed, ms_item, ms_resid


def _combine(ms_seed, ms_item, ms_resid, n_seeds: int, n_items: int, shared: float, resid_weight: float):
    """The variance of the estimate and its Satterthwaite df from the mean squares of a complete
    S × I block. Var = σ_a²/S + σ_b²·``shared`` + σ_e²·``resid_weight``, with σ_a² = (MS_seed − MS_resid)/I,
    σ_b² = max(0, MS_item − MS_resid)/S and σ_e² = MS_resid; for a balanced table ``shared`` = 1/I and
    ``resid_weight`` = 1/(S·I), which gives [MS_seed + max(0, MS_item − MS_resid)]/(S·I)."""
    item_on = (ms_item > ms_resid).astype(np.float64)
    c_seed = np.full(np.shape(ms_seed), 1.0 / (n_seeds * n_items))
    c_item = item_on * shared / n_seeds
    c_resid = resid_weight - c_seed - c_item
    var = c_seed * ms_seed + c_item * ms_item + c_resid * ms_resid
    # Unbalanced tables only (resid_weight < 1/(S·I)): a seed component estimated well below zero can
    # push the sum to zero or below; then the residual-only variance stands (with the residual's df).
    floor = var <= 0
    var = np.where(floor, resid_weight * ms_resid, var)
    c_seed, c_item = np.where(floor, 0.0, c_seed), np.where(floor, 0.0, c_item)
    c_resid = np.where(floor, resid_weight, c_resid)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = ((c_seed * ms_seed) ** 2 / (n_seeds - 1) + (c_item * ms_item) ** 2 / (n_items - 1)
                 + (c_resid * ms_resid) ** 2 / ((n_seeds - 1) * (n_items - 1)))
        df = np.where(denom > 0, var ** 2 / denom, float(n_seeds - 1))
    # With a negative coefficient Satterthwaite's df collapse (below 1, intervals of ±100 on a difference
    # of scores in [0, 1]) when MS_item barely exceeds MS_resid: a small, noisy prompt component. The
    # variance is at least the seed term, a mean square with S − 1 df, so the df are floored at the smaller
    # of the two main terms' df; the simulations of tests/test_effects.py hold 0.95–0.98 with the floor.
    df = np.maximum(df, float(min(n_seeds - 1, n_items - 1)))
    return var, df


def _t_ends(estimate, se, df, level: float):
    with np.errstate(invalid="ignore"):
        q = stats.t.ppf(0.5 + level / 2, df)
    return estimate - q * se, estimate + q * se


def crossed_interval(d: np.ndarray, *, level: float = 0.95) -> CrossedFit:
    """The crossed seed × item interval of complete tables of paired differences, vectorised.

    ``d``: (..., S, I), one row per seed and one column per item (the same items on every seed), S ≥ 2.
    With I = 1 (one number per seed) it is the t-interval over the seeds (df = S − 1).
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim < 2 or d.shape[-2] < 2 or d.shape[-1] < 1:
        raise ValueError(f"crossed_interval: needs (..., seeds >= 2, items >= 1), got shape {d.shape}")
    n_seeds, n_items = d.shape[-2:]
    estimate = d.mean(axis=(-2, -1))
    if n_items == 1:
        se = d[..., 0].std(axis=-1, ddof=1) / math.sqrt(n_seeds)
        df = np.full(estimate.shape, float(n_seeds - 1))
    else:
        var, df = _combine(*_mean_squares(d), n_seeds, n_items, 1.0 / n_items, 1.0 / (n_seeds * n_items))
        se = np.sqrt(var)
    low, high = _t_ends(estimate, se, df, level)
    return CrossedFit(estimate, se, df, low, high)


def _as_items(diff: Any) -> dict[Any, float]:
    if isinstance(diff, Mapping):
        return {k: float(v) for k, v in diff.items() if not _is_missing(v)}
    values = np.asarray(diff, dtype=np.float64).ravel()
    return {i: float(v) for i, v in enumerate(values) if not math.isnan(v)}


def crossed_effect(diffs: Iterable[Mapping[Any, float] | np.ndarray], *, level: float = 0.95) -> Effect | None:
    """The estimate (mean over seeds of the mean per-item difference) with the crossed model's interval.

    ``diffs``: per seed, the per-item differences, as ``{item: difference}`` (items matched across
    seeds by key) or as an array (items matched by position). None when no seed has an item.
    """
    seeds = [d for d in (_as_items(x) for x in diffs) if d]
    if not seeds:
        return None
    n_seeds = len(seeds)
    means = np.array([np.mean(list(d.values())) for d in seeds])
    estimate = float(means.mean())
    n_items = sum(len(d) for d in seeds)
    if n_seeds == 1:  # the evaluation noise only
        values = np.fromiter(seeds[0].values(), dtype=np.float64)
        if values.size < 2:
            return Effect(estimate, math.nan, math.nan, math.nan, 1, n_items, math.nan)
        se, df = float(values.std(ddof=1) / math.sqrt(values.size)), float(values.size - 1)
    else:
        common = [k for k in seeds[0] if all(k in d for d in seeds[1:])]
        if len(common) < 2:  # no shared prompts: seeds are independent draws of everything
            se, df = float(means.std(ddof=1) / math.sqrt(n_seeds)), float(n_seeds - 1)
        else:
            block = np.array([[d[k] for k in common] for d in seeds])
            counts = np.array([len(d) for d in seeds], dtype=np.float64)
            sets = [set(d) for d in seeds]
            shared = sum(len(a & b) / (na * nb) for a, na in zip(sets, counts) for b, nb in zip(sets, counts))
            var, df = _combine(*_mean_squares(block), n_seeds, len(common), shared / n_seeds ** 2,
                               float(np.sum(1.0 / counts)) / n_seeds ** 2)
            se, df = float(np.sqrt(var)), float(df)
    low, high = _t_ends(estimate, se, df, level)
    return Effect(estimate, float(low), float(high), se, n_seeds, n_items, df)


# --------------------------------------------------------------------------------------------
# Pooling over testbed builds
# --------------------------------------------------------------------------------------------


def builds_fixed_effect(per_build: Sequence[Effect], *, level: float = 0.95) -> Effect | None:
    """The mean of per-build effects as an inference about *these* builds (builds fixed): the estimate is
    the mean of the builds' estimates, its variance Σ SE_b² / B², with Satterthwaite's degrees of freedom
    (Σ SE_b²)² / Σ (SE_b⁴ / df_b). Each build has its own test prompts, so the builds' estimates are
    independent. None without builds; no interval when a build has none."""
    effects = [e for e in per_build if e is not None]
    if not effects:
        return None
    n = len(effects)
    estimate = float(np.mean([e.estimate for e in effects]))
    n_seeds, n_items = sum(e.n_seeds for e in effects), sum(e.n_items for e in effects)
    se2 = np.array([e.se ** 2 for e in effects])
    dfs = np.array([e.df for e in effects])
    if np.isnan(se2).any() or np.isnan(dfs).any():
        return Effect(estimate, math.nan, math.nan, math.nan, n_seeds, n_items, math.nan)
    se = float(math.sqrt(se2.sum()) / n)
    denom = float(np.sum(se2 ** 2 / dfs))
    df = float(se2.sum() ** 2 / denom) if denom > 0 else float(dfs.min())
    low, high = _t_ends(estimate, se, df, level)
    return Effect(estimate, float(low), float(high), se, n_seeds, n_items, df)


def across_builds_effect(per_build: Sequence[Effect], *, level: float = 0.95) -> Effect | None:
    """The mean of per-build effects as an inference about a *new* build (builds random): a t-interval over
    the B builds' estimates (df = B − 1). Each estimate carries its build's seed and prompt noise as well as
    the build's own effect, so with balanced builds the interval is exact under normality whatever the
    share of each source (tests/test_effects.py simulates it). None with fewer than 2 builds."""
    effects = [e for e in per_build if e is not None]
    if len(effects) < 2:
        return None
    values = np.array([e.estimate for e in effects])
    estimate, df = float(values.mean()), float(len(values) - 1)
    se = float(values.std(ddof=1) / math.sqrt(len(values)))
    low, high = _t_ends(estimate, se, df, level)
    return Effect(estimate, float(low), float(high), se, sum(e.n_seeds for e in effects),
                  sum(e.n_items for e in effects), df)


# --------------------------------------------------------------------------------------------
# The hierarchical bootstrap (an option)
# --------------------------------------------------------------------------------------------


def hierarchical_bootstrap(diffs: Sequence[np.ndarray] | Iterable[np.ndarray], *, n_boot: int = N_BOOT,
                           seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> Effect | None:
    """The estimate (mean over seeds of the mean per-item difference) with its hierarchical-bootstrap
    interval and standard error: each of ``n_boot`` replicates draws the seeds with replacement and,
    within each drawn seed, its items with replacement (a fresh draw each time a seed is drawn).
    Under-covers when seeds dominate the variation and when items are shared across seeds (see the
    module's docstring); the default interval is `crossed_effect`.

    ``diffs``: one array of per-item differences per seed. None when no seed has an item.
    """
    diffs = [np.asarray(list(d.values()) if isinstance(d, Mapping) else d, dtype=np.float64).ravel()
             for d in diffs]
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
        df=float(n_seeds - 1) if n_seeds > 1 else float(diffs[0].size - 1),
    )


def _check_method(method: str) -> str:
    if method not in INTERVALS:
        raise ValueError(f"paired effects: unknown interval method {method!r}; use one of {', '.join(INTERVALS)}")
    return method


def paired_effect(row_items: Mapping[Any, Any], ref_items: Mapping[Any, Any], *, n_boot: int = N_BOOT,
                  seed: int = BOOTSTRAP_SEED, where: str = "row", method: str = DEFAULT_INTERVAL) -> Effect | None:
    """The effect row − reference from ``{seed: items}`` of each (None when no seed pairs up), with the
    crossed model's interval (``method="crossed"``) or the hierarchical bootstrap's (``"bootstrap"``;
    ``n_boot`` and ``seed`` apply to it only)."""
    _check_method(method)
    diffs = paired_items(row_items, ref_items, where=where)
    if method == "bootstrap":
        return hierarchical_bootstrap([np.fromiter(diffs[s].values(), dtype=np.float64) for s in diffs],
                                      n_boot=n_boot, seed=seed)
    return crossed_effect([diffs[s] for s in diffs])


def minimal_detectable_effect(se: float, *, alpha: float = 0.05, power: float = 0.8,
                              df: float = math.inf) -> float:
    """The smallest true difference a two-sided t test at level ``alpha`` detects with probability
    ``power``, given the estimate's standard error and the degrees of freedom of its t statistic: the δ
    with P(|T| > t_{1−α/2, df}) = ``power`` for T noncentral t (df, δ/se). With df = ∞ it is
    (z_{1−α/2} + z_{power}) · se (≈ 2.80 · se). NaN when se or df is NaN (no interval)."""
    if math.isnan(se) or math.isnan(df):
        return math.nan
    if df > 1e4:  # the normal limit (scipy's noncentral t loses accuracy at such df)
        z = NormalDist()
        return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * se
    if se == 0:
        return 0.0
    crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(ncp: float) -> float:
        # the far tail (the wrong sign) is negligible here; scipy returns NaN for it at a large ncp
        wrong_sign = float(np.nan_to_num(stats.nct.cdf(-crit, df, ncp), nan=0.0))
        return float(stats.nct.sf(crit, df, ncp)) + wrong_sign - power

    # the power rises with the noncentrality; the quantile sum brackets it from below, a wide step from above
    start = crit + stats.t.ppf(power, df)
    high = 2 * start
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.5 * start, high, xtol=1e-10)) * se


# --------------------------------------------------------------------------------------------
# Table support
# --------------------------------------------------------------------------------------------


def effects_by_row(df: pd.DataFrame, row_col: str, rows: Sequence[str], reference: str,
                   metrics: Iterable[str], *, n_boot: int = N_BOOT, seed: int = BOOTSTRAP_SEED,
                   table: str = "table", method: str = DEFAULT_INTERVAL) -> dict[str, list[Effect | None]]:
    """Per metric, per row of ``rows`` (in order): the effect of the row against ``reference``
    (`paired_effect`, with the crossed model's interval unless ``method="bootstrap"``).

    ``df`` holds one run per (row, seed): ``row_col`` names the row, ``seed`` the seed, and
    ``items.<metric>`` the per-item results (NaN/None: that run contributes no effect). The
    reference row itself, rows without items and rows sharing no seed with the reference get None.
    """
    _check_method(method)
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
            paired_effect(per_row.get(key, {}), ref_items, n_boot=n_boot, seed=seed, method=method,
                          where=f"{table}: {column} of row {key!r}")
            for key in rows
        ]
    return out


def _signed(value: float, digits: int) -> str:
    text = f"{value:+.{digits}f}"
    return "+" + text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def format_effect(effect: Effect | None, spec: MetricSpec) -> str:
    """An effect cell: ``+0.012 [+0.004, +0.020]`` with the metric's digits (×100 for a percentage,
    so it reads in percentage points); "–" for no effect; ``+0.012 [no interval]`` for one seed with
    one item."""
    if effect is None:
        return MISSING
    scale = 100 if spec.percent else 1
    if math.isnan(effect.low) or math.isnan(effect.high):
        return f"{_signed(effect.estimate * scale, spec.digits)} [no interval]"
    est, low, high = (_signed(v * scale, spec.digits) for v in (effect.estimate, effect.low, effect.high))
    return f"{est} [{low}, {high}]"


def _mde_text(effect: Effect, spec: MetricSpec) -> str | None:
    mde = effect.mde()
    if math.isnan(mde):
        return None
    return f"{mde * (100 if spec.percent else 1):.{spec.digits}f}"


def effect_header(metric: str, reference_name: str, spec: MetricSpec) -> str:
    """The column header, e.g. "Δ oracle vs DPO [95% CI]; MDE" or "Δ margin acc. vs DPO (pts) [95% CI]; MDE"."""
    short = EFFECT_METRICS.get(metric, (metric, metric))[0]
    unit = " (pts)" if spec.percent else ""
    return f"Δ {short} vs {reference_name}{unit} [95% CI]; MDE"


def effect_cells(effects: Sequence[Effect | None], spec: MetricSpec, runs: Sequence[int]) -> list[str]:
    """The column's cells: `format_effect` and the row's minimal detectable effect
    (``+0.012 [+0.004, +0.020]; 0.011``), with " (n=k)" when the effect rests on fewer seeds (k) than
    the row has runs, as the mean ± std cells do."""
    cells = []
    for effect, n in zip(effects, runs):
        cell = format_effect(effect, spec)
        if effect is not None:
            mde = _mde_text(effect, spec)
            if mde is not None:
                cell += f"; {mde}"
            if effect.n_seeds != int(n):
                cell += f" (n={effect.n_seeds})"
        cells.append(cell)
    return cells


def detection_limit_sentence(effects: Mapping[str, Sequence[Effect | None]], specs: Mapping[str, MetricSpec],
                             *, alpha: float = 0.05, power: float = 0.8) -> str | None:
    """The caption line saying how each row's minimal detectable effect (after the ";" of a Δ cell) is
    computed and its range per metric, e.g. "MDE (...): the smallest true difference ... With 3 seeds it is
    0.011–0.037 in oracle score over the rows; smaller differences are below the detection limit (80%
    power, 5% level)." None when no row has an effect."""
    parts, seeds = [], set()
    for metric, row_effects in effects.items():
        present = [e for e in row_effects if e is not None]
        mdes = [m for m in (e.mde(alpha=alpha, power=power) for e in present) if not math.isnan(m)]
        if not mdes:
            continue
        spec = specs[metric]
        scale, unit = (100, " pts") if spec.percent else (1, "")
        low, high = (f"{v * scale:.{spec.digits}f}" for v in (min(mdes), max(mdes)))
        span = f"{low}{unit}" if low == high else f"{low}–{high}{unit}"
        parts.append(f"{span} in {EFFECT_METRICS.get(metric, (metric, metric))[1]}")
        seeds.update(e.n_seeds for e in present)
    if not parts:
        return None
    low, high = min(seeds), max(seeds)
    count = f"{low}" if low == high else f"{low}–{high}"
    noun = "seed" if high == 1 else "seeds"
    only = " (evaluation noise only)" if high == 1 else ""
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return (f"MDE (after the ; in a Δ cell): the smallest true difference a two-sided t test at the {alpha:.0%} "
            f"level detects with {power:.0%} power, from the row's own standard error and degrees of freedom "
            f"(noncentral t). With {count} {noun}{only} it is {listed} over the rows; smaller differences are below the "
            f"detection limit ({power:.0%} power, {alpha:.0%} level).")


def effects_caption(reference_name: str, method: str = DEFAULT_INTERVAL) -> str:
    """The caption sentence that explains the Δ columns."""
    _check_method(method)
    interval = (
        "a 95% t-interval from a crossed seed × item random-effects model (seeds and test items as crossed "
        "random effects, the same items on every seed; two-way ANOVA mean squares, Satterthwaite degrees of "
        "freedom)" if method == "crossed" else
        f"a 95% hierarchical-bootstrap interval (seeds, and items within them, resampled; {N_BOOT} replicates)"
    )
    return (
        f"Δ vs {reference_name}: the paired difference to {reference_name}'s run of the same seed (per test "
        "prompt for the oracle score; per test pair for margin accuracy, in percentage points), averaged over "
        f"seeds, with {interval}; (n=k): the seeds it rests on, when fewer than the row's runs; – in a Δ column: "
        "the reference row itself, or no per-item results to pair."
    )
