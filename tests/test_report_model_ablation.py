"""The model ablation (the paper's Table 2): golden files from a committed frame fixture, every cell against an
independent mean / std, Δ against DPO of the same pair, and the `model-ablation` study spec.

Regenerate the golden files after an intended change with
``TVKD_UPDATE_GOLDEN=1 pytest tests/test_report_model_ablation.py`` and review the diff.
"""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import pytest

from reports.model_ablation import (
    METHODS,
    PAIRS,
    format_model_ablation,
    grouped_summary,
    write_model_ablation,
)
from reports.tables import TABLES, discover
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
    return fixture_records("model_ablation")


def frame() -> pd.DataFrame:
    return fixture_frame("model_ablation")




@pytest.mark.parametrize("suffix", ["md", "tex"])
def test_golden(tmp_path, suffix):
    paths = write_model_ablation(frame(), tmp_path)
    assert_golden(paths[suffix], f"model_ablation.{suffix}")


def test_cells_equal_an_independent_mean_and_std():
    runs = records()
    table = markdown_rows(format_model_ablation(frame()))
    assert [cells[0] for cells in table] == [m.name for m in METHODS]
    for method, cells in zip(METHODS, table):
        for g, pair in enumerate(PAIRS):
            mine = [r for r in runs if r["variant"] == method.variant and r["pair"] == pair.key]
            oracle = [r["oracle_score"] for r in mine]
            margin = [r["margin_accuracy"] * 100 for r in mine]
            assert_cell(cells[1 + 2 * g], oracle, 3)
            assert_cell(cells[2 + 2 * g], margin, 1)
        assert cells[-1] == "3"


def test_effect_is_against_dpo_of_the_same_pair():
    runs = records()
    for pair in PAIRS:
        dpo = {r["seed"]: r["items.oracle_score"] for r in runs if r["variant"] == "dpo" and r["pair"] == pair.key}
        tvkd = [r for r in runs if r["variant"] == "tvkd" and r["pair"] == pair.key]
        expected = np.mean([np.mean([r["items.oracle_score"][p] - dpo[r["seed"]][p] for p in dpo[r["seed"]]])
                            for r in tvkd])
        summary = grouped_summary(frame(), "pair", PAIRS, METHODS).set_index("variant")
        assert summary.loc["tvkd", f"{pair.key}.effect"].estimate == pytest.approx(expected, abs=1e-12)
        assert summary.loc["dpo", f"{pair.key}.effect"] is None


def test_problems_are_named():
    df = frame()
    with pytest.raises(ValueError, match="several runs"):
        grouped_summary(pd.concat([df, df.iloc[[0]]]), "pair", PAIRS, METHODS)
    with pytest.warns(UserWarning, match="match no table row"):
        grouped_summary(pd.concat([df, pd.DataFrame([{"variant": "ipo", "pair": "base", "seed": 0}])],
                                  ignore_index=True), "pair", PAIRS, METHODS)
    with pytest.raises(KeyError, match="pair"):
        grouped_summary(df.drop(columns=["pair"]), "pair", PAIRS, METHODS)


def test_registered_and_the_spec_expands():
    discover()
    assert TABLES.meta("model_ablation")["study"] == "model-ablation"
    spec = load_study("model-ablation")
    runs = expand_study(spec)
    assert len(spec["seeds"]) >= 3 and len(runs) == len(spec["seeds"]) * 4 * 3
    sizes = {info["pair"]: cfg.testbed for info, cfg in runs}
    assert set(sizes) == {p.key for p in PAIRS}
    assert sizes["base"] == {} and sizes["small-student"]["student_hidden"] == 32
    assert sizes["large"]["teacher_layers"] > 4 and sizes["large"]["student_layers"] > 2
    assert len(expand_study(spec, quick=True)) == 4


def test_plan_with_the_paper_profile_runs_offline(capsys, tmp_path):
    from tests.test_trust import cli

    code, out, err = cli(capsys, "study", "plan", "model-ablation", "--profile", "paper", "--results", tmp_path)
    assert code == 0, err
    assert "model-ablation-paper" in out and "GPU-hours for 12 run(s)" in out


def test_compare_paper_maps_each_pair_to_its_own_runs():
    from reports.compare import compare_to_paper
    from reports.model_ablation import PAPER_MAPS

    assert len(PAPER_MAPS) == 3
    runs = records()
    for pmap, pair in zip(PAPER_MAPS, PAIRS):
        (rm,) = compare_to_paper(frame(), pmap).metrics  # no MT-Bench scores in the fixture
        cells = rm.cells.set_index("row")
        assert list(cells.index) == ["dpo", "simpo", "dckd", "tvkd"]
        expected = statistics.mean(r["oracle_score"] for r in runs if r["variant"] == "simpo" and r["pair"] == pair.key)
        assert cells.loc["simpo", "ours"] == pytest.approx(expected)
    assert PAPER_MAPS[0].where == {"teacher": "Mistral-7B", "student": "Danube-500M"}
