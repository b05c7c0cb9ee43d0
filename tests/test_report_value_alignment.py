"""The value-alignment table (the paper's Table 4): golden files from a committed frame fixture, every cell
against an independent mean / std, the seed-paired Δ value KL, and the `value-alignment` study spec.

Regenerate the golden files after an intended change with
``TVKD_UPDATE_GOLDEN=1 pytest tests/test_report_value_alignment.py`` and review the diff.
"""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import pytest

from reports.tables import TABLES, discover
from reports.value_alignment import (
    ROWS,
    format_value_alignment,
    value_alignment_summary,
    write_value_alignment,
)
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
    return fixture_records("value_alignment")


def frame() -> pd.DataFrame:
    return fixture_frame("value_alignment")




@pytest.mark.parametrize("suffix", ["md", "tex"])
def test_golden(tmp_path, suffix):
    paths = write_value_alignment(frame(), tmp_path)
    assert_golden(paths[suffix], f"value_alignment.{suffix}")
    again = write_value_alignment(frame(), tmp_path / "again")
    assert again[suffix].read_bytes() == paths[suffix].read_bytes()


def test_cells_equal_an_independent_mean_and_std():
    by_label: dict[str, list[dict]] = {}
    for r in records():
        by_label.setdefault(r["label"], []).append(r)
    table = markdown_rows(format_value_alignment(frame()))
    assert [cells[0] for cells in table] == [r.name for r in ROWS]
    for row, cells in zip(ROWS, table):
        runs = by_label[row.label]
        for column, (metric, digits, scale) in enumerate(
                [("value_kl", 4, 1), ("policy_kl", 3, 1), ("oracle_score", 3, 1), ("margin_accuracy", 1, 100)], 1):
            values = [r[metric] * scale for r in runs if r[metric] is not None]
            if values:
                assert_cell(cells[column], values, digits)
            else:
                assert cells[column] == "–", (row.label, metric)
        assert cells[-1] == str(len(runs))


def test_value_kl_effect_is_the_mean_per_seed_difference():
    runs = records()
    dpo = {r["seed"]: r["value_kl"] for r in runs if r["label"] == "dpo"}
    expected = np.mean([r["value_kl"] - dpo[r["seed"]] for r in runs if r["label"] == "tvkd"])
    summary = value_alignment_summary(frame()).set_index("label")
    effect = summary.loc["tvkd", "effect.value_kl"]
    assert effect.estimate == pytest.approx(expected, abs=1e-12) and effect.n_seeds == 3
    assert effect.low <= effect.estimate <= effect.high
    # the untrained rows and the reference itself get no Δ
    for label in ("teacher_dpo", "student_sft", "dpo"):
        assert summary.loc[label, "effect.value_kl"] is None and summary.loc[label, "effect.oracle_score"] is None
    assert summary.loc["tvkd-shuffled", "effect.oracle_score"] is not None


def test_only_the_trained_students_are_ranked():
    text = format_value_alignment(frame())
    table = dict((cells[0], cells) for cells in markdown_rows(text))
    raw = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "**" not in raw["DPO Teacher"] and "**" not in raw["TVKD, shuffled Ψ (control)"]
    assert table["DPO Teacher"][1] == "0.0000 ± 0.0000"


def test_problems_are_named():
    df = frame()
    with pytest.raises(ValueError, match="several runs for one"):
        value_alignment_summary(pd.concat([df, df.iloc[[2]]]))
    with pytest.warns(UserWarning, match="match no table row"):
        value_alignment_summary(pd.concat([df, pd.DataFrame([{"label": "simpo", "seed": 0}])], ignore_index=True))
    with pytest.raises(KeyError, match="label"):
        value_alignment_summary(df.drop(columns=["label"]))


def test_registered_and_the_spec_expands():
    discover()
    assert TABLES.meta("value_alignment")["study"] == "value-alignment"
    spec = load_study("value-alignment")
    runs = expand_study(spec)
    assert len(spec["seeds"]) >= 3 and len(runs) == 5 * len(spec["seeds"])
    labels = {info["label"]: cfg for info, cfg in runs if cfg.seed == 0}
    assert set(labels) == {r.label for r in ROWS}
    assert labels["teacher_dpo"].eval_only and labels["student_sft"].eval_only
    assert all(cfg.eval.value_alignment > 0 for cfg in labels.values())
    assert labels["tvkd-shuffled"].loss.options["control"] == "shuffled"
    assert len(expand_study(spec, quick=True)) == 5


@pytest.mark.parametrize("study", ["value-alignment"])
def test_plan_with_the_paper_profile_runs_offline(capsys, tmp_path, study):
    """`tvkd study plan --profile paper` validates the spec and its profile and lists the paper's runs with a
    GPU-hour estimate, without a model, a data set or the testbed."""
    from tests.test_trust import cli

    code, out, err = cli(capsys, "study", "plan", study, "--profile", "paper", "--results", tmp_path)
    assert code == 0, err
    assert f"{study}-paper" in out and "GPU-hours for 5 run(s)" in out


def test_compare_paper_maps_the_papers_table_4():
    from reports.compare import compare_to_paper
    from reports.value_alignment import PAPER_MAPS

    (pmap,) = PAPER_MAPS
    result = compare_to_paper(frame(), pmap)
    kl, score = result.metrics
    assert kl.ours_column == "value_kl" and not kl.higher_is_better
    cells = kl.cells.set_index("row")
    assert "teacher_dpo" not in cells.index  # the paper's teacher KL cell is blank
    expected = statistics.mean(r["value_kl"] for r in records() if r["label"] == "tvkd")
    assert cells.loc["tvkd", "ours"] == pytest.approx(expected) and cells.loc["tvkd", "paper"] == pytest.approx(1.202)
    assert score.ours_column == "oracle_score" and set(score.cells["row"]) == {"teacher_dpo", "dpo", "tvkd"}
