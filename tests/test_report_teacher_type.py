"""The teacher-type tables (the paper's Tables 8, 9): golden files from a committed frame fixture, every cell
against an independent mean / std, one DPO control shared by every teacher, and the `teacher-type` spec.

Regenerate the golden files after an intended change with
``TVKD_UPDATE_GOLDEN=1 pytest tests/test_report_teacher_type.py`` and review the diff.
"""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import pytest

from reports.tables import TABLES, discover
from reports.teacher_type import METHODS, TEACHERS, format_teacher_type, write_teacher_type
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
    return fixture_records("teacher_type")


def frame() -> pd.DataFrame:
    return fixture_frame("teacher_type")




@pytest.mark.parametrize("suffix", ["md", "tex"])
def test_golden(tmp_path, suffix):
    paths = write_teacher_type(frame(), tmp_path)
    assert_golden(paths[suffix], f"teacher_type.{suffix}")


def test_cells_equal_an_independent_mean_and_std_and_dpo_is_shared():
    runs = records()
    table = markdown_rows(format_teacher_type(frame()))
    assert [cells[0] for cells in table] == [m.name for m in METHODS]
    for method, cells in zip(METHODS, table):
        for g, teacher in enumerate(TEACHERS):
            mine = [r for r in runs if r["variant"] == method.variant
                    and (r["teacher"] == teacher.key or method.variant == "dpo")]
            oracle = [r["oracle_score"] for r in mine]
            assert len(oracle) == 3
            assert_cell(cells[1 + 2 * g], oracle, 3)
        assert cells[-1] == "3"
    dpo_cells = table[-1]
    assert dpo_cells[1] == dpo_cells[3] == dpo_cells[5]  # the same DPO runs in every teacher's column
    tvkd = [r for r in runs if r["variant"] == "tvkd" and r["teacher"] == "instruct"]
    dpo = {r["seed"]: r["items.oracle_score"] for r in runs if r["variant"] == "dpo"}
    expected = np.mean([np.mean([r["items.oracle_score"][p] - dpo[r["seed"]][p] for p in dpo[r["seed"]]])
                        for r in tvkd])
    assert table[1][-2].startswith(f"{expected:+.3f} [")


def test_registered_and_the_spec_expands():
    discover()
    assert TABLES.meta("teacher_type")["study"] == "teacher-type"
    spec = load_study("teacher-type")
    runs = expand_study(spec)
    assert len(spec["seeds"]) >= 3 and len(runs) == len(spec["seeds"]) * (1 + 2 * 3)
    teachers = {info.get("teacher"): cfg for info, cfg in runs if cfg.seed == 0 and info["variant"] == "tvkd"}
    assert teachers["sft"].models.teacher == "testbed:teacher_sft"
    assert teachers["instruct"].testbed and teachers["dpo"].testbed == {}
    assert [cfg.loss.name for info, cfg in runs if info["label"] == "dpo"] == ["dpo"] * len(spec["seeds"])
    assert len(expand_study(spec, quick=True)) == 5


def test_plan_with_the_paper_profile_runs_offline(capsys, tmp_path):
    from tests.test_trust import cli

    code, out, err = cli(capsys, "study", "plan", "teacher-type", "--profile", "paper", "--results", tmp_path)
    assert code == 0, err
    assert "teacher-type-paper" in out and "GPU-hours for 7 run(s)" in out


def test_compare_paper_orders_the_teacher_types_per_method():
    from reports.compare import compare_to_paper
    from reports.teacher_type import PAPER_MAPS

    maps = {p.name: p for p in PAPER_MAPS}
    assert set(maps) == {"table8_dckd", "table8_tvkd", "table9_dckd", "table9_tvkd"}
    (rm,) = compare_to_paper(frame(), maps["table8_tvkd"]).metrics
    cells = rm.cells.set_index("row")
    assert list(cells.index) == ["dpo", "sft", "instruct"]
    assert cells.loc["instruct", "paper"] == pytest.approx(-1.56)  # the paper's "TPKD" row
    expected = statistics.mean(r["oracle_score"] for r in records() if r["variant"] == "tvkd"
                               and r["teacher"] == "instruct")
    assert cells.loc["instruct", "ours"] == pytest.approx(expected)
    assert compare_to_paper(frame(), maps["table9_tvkd"]).metrics == []  # no MT-Bench in the fixture: said, not faked
