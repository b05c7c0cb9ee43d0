"""The testbed-power table (reports/testbed_power.py) on a synthetic 3-build frame: per-build effects are each
build's own crossed seed × prompt effect against DPO of that build, pooled as the effects module says; the study
expands to builds × seeds × variants and registers its table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reports.effects import across_builds_effect, builds_fixed_effect, crossed_effect
from reports.testbed_power import BUILD, format_testbed_power, power_summary
from studies import load_spec

BUILDS, SEEDS, PROMPTS = (0, 1, 2), (0, 1, 2), 20
#: Per build, the true gain over DPO of each variant: the ceiling helps everywhere, soft_value on one build only.
GAINS = {"dpo": (0.0, 0.0, 0.0), "dpo-oracle-labels": (0.05, 0.06, 0.04), "soft_value": (0.03, 0.0, 0.0)}


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for b in BUILDS:
        prompts = [f"b{b}-p{i}" for i in range(PROMPTS)]  # each build its own test prompts
        base = rng.uniform(0.3, 0.7, PROMPTS)
        for s in SEEDS:
            for variant, gains in GAINS.items():
                scores = np.clip(base + gains[b] + rng.normal(0, 0.02, PROMPTS), 0, 1)
                outcomes = [float(x) for x in rng.random(12) < 0.6 + gains[b]]
                rows.append({"label": f"{variant},testbed.seed={b}", "variant": variant, BUILD: b, "seed": s,
                             "oracle_score": float(scores.mean()), "margin_accuracy": float(np.mean(outcomes)),
                             "items.oracle_score": dict(zip(prompts, scores.tolist())),
                             "items.margin_accuracy": outcomes})
    return pd.DataFrame(rows)


def test_per_build_effects_pair_each_build_with_its_own_dpo_and_pool_as_specified():
    df = _frame()
    summary, builds = power_summary(df)
    assert builds == list(BUILDS) and list(summary["key"]) == ["dpo-oracle-labels", "soft_value"]
    row = summary.set_index("key").loc["soft_value"]
    expected = []
    for b in BUILDS:
        part = df[df[BUILD] == b].set_index(["variant", "seed"])
        diffs = [{p: part.loc[("soft_value", s), "items.oracle_score"][p] - part.loc[("dpo", s), "items.oracle_score"][p]
                  for p in part.loc[("dpo", s), "items.oracle_score"]} for s in SEEDS]
        effect = crossed_effect(diffs)
        assert row[f"build.{b}.oracle_score"] == effect
        expected.append(effect)
    assert row["fixed.oracle_score"] == builds_fixed_effect(expected)
    assert row["random.oracle_score"] == across_builds_effect(expected)
    assert expected[0].low > 0 and row["signs.oracle_score"].startswith("1 above, 0 below of 3")
    ceiling = summary.set_index("key").loc["dpo-oracle-labels"]
    assert ceiling["signs.oracle_score"] == "3 above, 0 below of 3" and ceiling["random.oracle_score"].low > 0
    assert int(ceiling["n"]) == len(BUILDS) * len(SEEDS)


def test_the_table_names_rows_and_pooled_columns_and_says_how():
    text = format_testbed_power(_frame())
    assert "| DPO on oracle labels (ceiling)" in text and "| soft_value " in text and "| dpo " not in text
    for header in ("Δ build 0 [95% CI]", "Δ build 2 [95% CI]", "Δ these builds [95% CI]; MDE",
                   "Δ a new build [95% CI]; MDE", "Builds vs 0"):
        assert header in text
    assert "B − 1 degrees of freedom" in text and "DPO's mean oracle score, build 0:" in text
    latex = format_testbed_power(_frame(), "latex")
    assert r"\label{tab:testbed-power}" in latex


def test_a_frame_without_the_build_axis_is_named():
    with pytest.raises(KeyError, match="testbed.seed"):
        power_summary(_frame().drop(columns=[BUILD]))


def test_the_study_crosses_three_builds_with_ten_seeds():
    spec = load_spec("testbed-power")
    runs = spec.runs()
    variants = {r.info.get("variant") for r in runs}
    assert {"dpo", "dpo-oracle-labels", "oracle-gap", "soft_value-shuffled", "max", "margin", "expectation",
            "soft_value", "rho=1.00", "rho=0.50", "rho=0.00"} == variants
    assert len(spec.seeds) >= 10 and sorted({r.info[BUILD] for r in runs}) == [0, 1, 2]
    assert len(runs) == 11 * 3 * len(spec.seeds) and spec.table == "testbed_power"
    ceiling = next(r for r in runs if r.info.get("variant") == "dpo-oracle-labels")
    assert ceiling.config.data.source == "testbed:student_pref_train_oracle"
    assert {r.config.testbed.get("seed") for r in runs} == {0, 1, 2}
