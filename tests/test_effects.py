"""Paired effect sizes (reports/effects.py): the hierarchical bootstrap's coverage on simulated studies,
the estimate on hand-computed examples, the pairing rules, the minimal detectable effect and the cells."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from reports.effects import (
    Effect,
    detection_limit_sentence,
    effect_cells,
    effect_header,
    effects_by_row,
    format_effect,
    hierarchical_bootstrap,
    minimal_detectable_effect,
    paired_differences,
    paired_effect,
)
from reports.tables import MetricSpec

ORACLE = MetricSpec("Oracle score", digits=3)
ACCURACY = MetricSpec("Margin accuracy (%)", digits=1, percent=True)


def test_the_interval_covers_the_true_difference_at_about_the_nominal_rate():
    """400 simulated studies of 5 seeds × 200 items: per seed a training effect around the true
    difference (sd 0.01), per item evaluation noise (sd 0.15, so a seed's item mean has sd ≈ 0.011).
    About 95% of the intervals should hold the true difference."""
    true_difference, studies, seeds, items = 0.01, 400, 5, 200
    rng = np.random.default_rng(1)
    seed_effects = rng.normal(true_difference, 0.01, size=(studies, seeds))
    diffs = seed_effects[..., None] + rng.normal(0, 0.15, size=(studies, seeds, items))
    effects = [hierarchical_bootstrap(list(study), seed=k) for k, study in enumerate(diffs)]
    coverage = np.mean([e.low <= true_difference <= e.high for e in effects])
    assert 0.90 <= coverage <= 0.99, coverage  # 0.9575 with these seeds
    assert all(e.low <= e.estimate <= e.high and e.n_seeds == seeds and e.n_items == seeds * items for e in effects)
    # the bootstrap SE tracks the estimate's actual spread across the simulated studies
    spread = np.std([e.estimate for e in effects], ddof=1)
    assert np.median([e.se for e in effects]) == pytest.approx(spread, rel=0.25)


def test_the_estimate_is_the_mean_over_seeds_of_the_mean_paired_difference():
    # oracle scores: matched by prompt; prompts missing or None on either side are left out
    row = {0: {"a": 1.0, "b": 2.0, "c": None, "only here": 9.0}, 1: {"a": 0.5}, 3: {"a": 7.0}}
    ref = {0: {"a": 0.5, "b": 1.0, "c": 3.0}, 1: {"a": 0.0, "b": 4.0}, 2: {"a": 1.0}}
    diffs = paired_differences(row, ref)
    assert sorted(diffs) == [0, 1] and diffs[0].tolist() == [0.5, 1.0] and diffs[1].tolist() == [0.5]
    effect = paired_effect(row, ref)
    assert effect.estimate == pytest.approx((0.75 + 0.5) / 2)  # each seed counts once, not each item
    assert effect.n_seeds == 2 and effect.n_items == 3
    # margin accuracy: matched by position; a NaN on either side drops that position
    row = {0: [1, 0, 0.5, 1, math.nan], 1: [1, 1]}
    ref = {0: [0, 0, 1, 1, 1], 1: [0, 1]}
    effect = paired_effect(row, ref)
    assert effect.estimate == pytest.approx((0.125 + 0.5) / 2) and effect.n_items == 6


def test_no_shared_item_or_seed_gives_no_effect_and_kinds_must_agree():
    assert paired_effect({0: {"a": 1.0}}, {0: {"b": 1.0}}) is None
    assert paired_effect({0: [1.0]}, {1: [0.0]}) is None
    assert paired_effect({0: math.nan}, {0: [0.0]}) is None
    assert hierarchical_bootstrap([]) is None and hierarchical_bootstrap([np.array([])]) is None
    with pytest.raises(TypeError, match="different kinds"):
        paired_effect({0: {"a": 1.0}}, {0: [1.0]})
    with pytest.warns(UserWarning, match="same test set"):
        assert paired_effect({0: [1, 0, 1]}, {0: [1, 0]}) is None


def test_the_bootstrap_resamples_seeds_and_is_reproducible():
    # Constant differences within each seed: resampling items alone would give a zero-width interval.
    diffs = [np.zeros(10), np.ones(10), np.full(10, 2.0)]
    effect = hierarchical_bootstrap(diffs)
    assert effect.estimate == pytest.approx(1.0) and effect.low < 0.5 and effect.high > 1.5
    assert effect.se == pytest.approx(math.sqrt((2 / 3) / 3), rel=0.05)  # the plug-in variance of a mean of 3
    assert hierarchical_bootstrap(diffs) == effect  # a fixed generator seed: the same table every time
    assert hierarchical_bootstrap(diffs, seed=1) != effect
    one = hierarchical_bootstrap([np.array([0.2, 0.2, 0.2])])
    assert (one.estimate, one.low, one.high, one.se) == pytest.approx((0.2, 0.2, 0.2, 0.0))


def test_minimal_detectable_effect():
    assert minimal_detectable_effect(1.0) == pytest.approx(1.959964 + 0.841621, abs=1e-6)
    assert minimal_detectable_effect(0.002) == pytest.approx(0.0056032, abs=1e-6)
    assert minimal_detectable_effect(0.0) == 0.0
    assert minimal_detectable_effect(1.0, power=0.5) == pytest.approx(1.959964, abs=1e-6)


def test_effect_cells_and_headers():
    effect = Effect(0.0123, 0.0041, 0.0199, 0.004, n_seeds=3, n_items=300)
    assert format_effect(effect, ORACLE) == "+0.012 [+0.004, +0.020]"
    assert format_effect(Effect(-0.0123, -0.02, -0.0004, 0.005, 3, 300), ACCURACY) == "-1.2 [-2.0, +0.0]"
    assert format_effect(None, ORACLE) == "–"
    assert effect_cells([effect, None, effect], ORACLE, [3, 3, 4]) == [
        "+0.012 [+0.004, +0.020]", "–", "+0.012 [+0.004, +0.020] (n=3)"]
    assert effect_header("oracle_score", "DPO", ORACLE) == "Δ oracle vs DPO [95% CI]"
    assert effect_header("margin_accuracy", "DPO", ACCURACY) == "Δ margin acc. vs DPO (pts) [95% CI]"


def test_detection_limit_sentence_uses_the_median_se():
    se = [0.001, 0.002, 0.004]
    effects = {"oracle_score": [Effect(0, 0, 0, s, 3, 100) for s in se] + [None],
               "margin_accuracy": [Effect(0, 0, 0, 0.0064, 3, 100), None]}
    sentence = detection_limit_sentence(effects, {"oracle_score": ORACLE, "margin_accuracy": ACCURACY})
    assert sentence == ("With 3 seeds, differences smaller than ±0.006 in oracle score and ±1.8 pts in margin "
                        "accuracy are below the detection limit (80% power, 5% level).")
    mixed = {"oracle_score": [Effect(0, 0, 0, 0.002, 1, 100), Effect(0, 0, 0, 0.002, 3, 100)]}
    assert detection_limit_sentence(mixed, {"oracle_score": ORACLE}).startswith("With 1–3 seeds, differences")
    single = {"oracle_score": [Effect(0, 0, 0, 0.002, 1, 100)], "margin_accuracy": [None]}
    assert detection_limit_sentence(single, {"oracle_score": ORACLE, "margin_accuracy": ACCURACY}) == (
        "With 1 seed (evaluation noise only), differences smaller than ±0.006 in oracle score are below the "
        "detection limit (80% power, 5% level).")
    assert detection_limit_sentence({"oracle_score": [None]}, {"oracle_score": ORACLE}) is None


def test_effects_by_row_pairs_runs_of_the_same_seed():
    frame = pd.DataFrame({
        "row": ["a", "a", "ref", "ref", "b", "c"],
        "seed": [0, 1, 0, 1, 0, 1],
        "items.oracle_score": [{"p": 1.0}, {"p": 2.0}, {"p": 0.5}, {"p": 1.0}, math.nan, {"p": 3.0}],
    })
    effects = effects_by_row(frame, "row", ["a", "ref", "b", "c", "absent"], "ref",
                             ["oracle_score", "margin_accuracy"])
    a, ref, b, c, absent = effects["oracle_score"]
    assert a.estimate == pytest.approx(0.75) and a.n_seeds == 2
    assert ref is None and b is None and absent is None  # the reference itself; no items; no runs
    assert c.estimate == pytest.approx(2.0) and c.n_seeds == 1
    assert effects["margin_accuracy"] == [None] * 5  # no items column
