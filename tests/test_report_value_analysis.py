"""The value-analysis table (the paper's Table 3): golden files from a committed frame fixture, every cell
against an independent mean / std, the DPO − SFT teacher differences, and the `value-analysis` study spec.

Regenerate the golden files after an intended change with
``TVKD_UPDATE_GOLDEN=1 pytest tests/test_report_value_analysis.py`` and review the diff.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reports.tables import TABLES, discover
from reports.value_analysis import format_value_analysis, value_analysis_summary, write_value_analysis
from tests.report_checks import (
    assert_cell,
    assert_golden,
    expand_study,
    fixture_frame,
    fixture_records,
    load_study,
    markdown_rows,
)


def records() -> list[dict]:
    return fixture_records("value_analysis")


def frame() -> pd.DataFrame:
    return fixture_frame("value_analysis")




@pytest.mark.parametrize("suffix", ["md", "tex"])
def test_golden(tmp_path, suffix):
    paths = write_value_analysis(frame(), tmp_path)
    assert_golden(paths[suffix], f"value_analysis.{suffix}")


def _expected() -> dict[tuple[str, str, str], list[float]]:
    """(row, teacher, truth) -> accuracies (fractions) per testbed seed, read from the fixture directly."""
    out: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in records():
        rows = {f"shaping:{r['aux']}": "shaping", "sum_logprob": "sum_logprob", "mean_logprob": "mean_logprob"}
        for row, name in rows.items():
            for truth, key in (("label", name), ("oracle", f"oracle_{name}")):
                out.setdefault((row, r["teacher"], truth), {})[r["testbed.seed"]] = r[f"teacher_scores/{key}"]
    return {k: [v[s] for s in sorted(v)] for k, v in out.items()}


def test_cells_equal_an_independent_mean_and_std():
    expected = _expected()
    names = {"Log prob. Σ log π_T": "sum_logprob", "Log prob. with LC Σ log π_T / \\|y\\|": "mean_logprob",
             "Shaping term Ψ, soft_value": "shaping:soft_value", "Shaping term Ψ, logits": "shaping:logits",
             "Shaping term Ψ, max": "shaping:max"}
    table = markdown_rows(format_value_analysis(frame()))
    assert [cells[0] for cells in table] == list(names)
    for cells in table:
        row = names[cells[0]]
        for column, (teacher, truth) in enumerate([("dpo", "label"), ("dpo", "oracle"), ("sft", "label"),
                                                    ("sft", "oracle")], 2):
            values = expected[(row, teacher, truth)]
            assert_cell(cells[column], [100 * v for v in values], 1)
        diff = 100 * np.mean(np.array(expected[(row, "dpo", "label")]) - np.array(expected[(row, "sft", "label")]))
        assert cells[6].startswith(f"{diff:+.1f} [")
        assert cells[-1] == "3"


def test_log_prob_rows_are_read_once_per_teacher_and_seed():
    summary = value_analysis_summary(frame()).set_index("key")
    assert summary.loc["sum_logprob", "n"] == 3 and summary.loc["shaping:soft_value", "n"] == 3
    assert summary.loc["sum_logprob", "effect.label"].n_seeds == 3
    # a second run of the same score, teacher and seed is an error, not an average
    df = frame()
    with pytest.raises(ValueError, match="several runs"):
        value_analysis_summary(pd.concat([df, df.iloc[[0]]]))
    with pytest.warns(UserWarning, match="no teacher"):
        value_analysis_summary(pd.concat([df, pd.DataFrame([{"teacher": "instruct", "aux": "max",
                                                              "testbed.seed": 0}])], ignore_index=True))
    with pytest.raises(KeyError, match="teacher"):
        value_analysis_summary(df.drop(columns=["teacher"]))


def test_registered_and_the_spec_expands():
    discover()
    assert TABLES.meta("value_analysis")["study"] == "value-analysis"
    spec = load_study("value-analysis")
    runs = expand_study(spec)
    seeds = spec["axes"]["testbed.seed"]
    assert len(seeds) >= 3 and len(runs) == len(seeds) * 2 * 6
    assert {cfg.testbed["seed"] for _, cfg in runs} == set(seeds)
    assert {cfg.models.teacher for _, cfg in runs} == {"testbed:teacher_dpo", "testbed:teacher_sft"}
    assert all(cfg.loss.name == "tvkd" and cfg.eval.teacher_scores and not cfg.eval.generate for _, cfg in runs)
    assert len(expand_study(spec, quick=True)) == 2


@pytest.mark.parametrize("study", ["value-analysis"])
def test_plan_with_the_paper_profile_runs_offline(capsys, tmp_path, study):
    """`tvkd study plan --profile paper` validates the spec and its profile and lists the paper's runs with a
    GPU-hour estimate, without a model, a data set or the testbed."""
    from tests.test_trust import cli

    code, out, err = cli(capsys, "study", "plan", study, "--profile", "paper", "--results", tmp_path)
    assert code == 0, err
    assert f"{study}-paper" in out and "GPU-hours for 12 run(s)" in out
