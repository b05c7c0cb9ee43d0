"""MT-Bench per category (the paper's Figures 2, 3): golden tables and byte-identical radars from a committed
frame fixture, every cell against an independent mean / std, the testbed question set, and the
`mt-bench-categories` study spec (the end-to-end run, training included, is slow).

Regenerate the golden files after an intended change with
``TVKD_UPDATE_GOLDEN=1 pytest tests/test_report_mt_bench_categories.py`` and review the diff.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reports.mt_bench_categories import (
    categories,
    format_mt_bench_categories,
    mt_bench_summary,
    write_mt_bench_categories,
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
    return fixture_records("mt_bench_categories")


def frame() -> pd.DataFrame:
    return fixture_frame("mt_bench_categories")




@pytest.mark.parametrize("suffix", ["md", "tex"])
def test_golden(tmp_path, suffix):
    paths = write_mt_bench_categories(frame(), tmp_path)
    assert_golden(paths[suffix], f"mt_bench_categories.{suffix}")


def test_radar_is_byte_identical_across_builds(tmp_path):
    first = write_mt_bench_categories(frame(), tmp_path / "a")
    second = write_mt_bench_categories(frame(), tmp_path / "b")
    assert first["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and first["pdf"].read_bytes()[:5] == b"%PDF-"
    for fmt in ("png", "pdf"):
        assert first[fmt].read_bytes() == second[fmt].read_bytes(), fmt


def test_cells_equal_an_independent_mean_and_std():
    runs = records()
    assert categories(frame()) == ["sort", "reverse", "dedupe", "count"]  # the testbed's task order
    table = markdown_rows(format_mt_bench_categories(frame()))
    labels = ["sft", "dpo", "tvkd", "tvkd-shuffled"]
    assert len(table) == len(labels)
    dpo = {r["seed"]: r["mt_bench/score"] for r in runs if r["label"] == "dpo"}
    for label, cells in zip(labels, table):
        mine = [r for r in runs if r["label"] == label]
        for column, key in enumerate(["sort", "reverse", "dedupe", "count"], 1):
            assert_cell(cells[column], [r[f"mt_bench/category/{key}"] for r in mine], 2)
        assert_cell(cells[5], [r["mt_bench/score"] for r in mine], 2)
        if label == "dpo":
            assert cells[6] == "–"
        else:
            expected = np.mean([r["mt_bench/score"] - dpo[r["seed"]] for r in mine])
            assert cells[6].startswith(f"{expected:+.2f} [")
        assert cells[-1] == "3"


def test_without_benchmark_scores_the_table_says_so():
    df = frame()[["label", "seed"]]
    with pytest.warns(UserWarning, match="run the MT-Bench benchmark"):
        summary = mt_bench_summary(df)
    assert list(summary["label"]) == ["sft", "dpo", "tvkd", "tvkd-shuffled"]
    with pytest.raises(ValueError, match="several runs"):
        mt_bench_summary(pd.concat([frame(), frame().iloc[[0]]]))


def test_testbed_questions_load_as_mt_bench_data(tmp_path):
    from studies.mt_bench_categories import write_testbed_questions
    from tvkd.benchmarks import mt_bench
    from tvkd.testbed.tasks import TASKS, parse_prompt, score

    root = write_testbed_questions(tmp_path / "a", per_category=3)
    again = write_testbed_questions(tmp_path / "b", per_category=3)
    assert (root / "mt_bench" / "question.jsonl").read_bytes() == (again / "mt_bench" / "question.jsonl").read_bytes()
    questions = mt_bench.load_questions(mt_bench.data_dir(root))
    assert len(questions) == 3 * len(TASKS) and {q["category"] for q in questions} == set(TASKS)
    references = mt_bench.load_reference_answers(root)
    prompts = mt_bench.load_judge_prompts(root)
    assert {"single-v1", "single-v1-multi-turn"} <= set(prompts)
    for q in questions:
        assert parse_prompt(q["turns"][0]).task == q["category"] and len(q["turns"]) == 2
        assert [score(t, a) for t, a in zip(q["turns"], references[q["question_id"]])] == [1.0, 1.0]


def test_registered_and_the_spec_expands():
    discover()
    assert TABLES.meta("mt_bench_categories")["study"] == "mt-bench-categories"
    spec = load_study("mt-bench-categories")
    runs = expand_study(spec)
    assert len(spec["seeds"]) >= 3 and len(runs) == 4 * len(spec["seeds"])
    assert all(cfg.train.save_model or cfg.eval_only for _, cfg in runs)
    assert len(expand_study(spec, quick=True)) == 4


def test_plan_with_the_paper_profile_runs_offline(capsys, tmp_path):
    from tests.test_trust import cli

    code, out, err = cli(capsys, "study", "plan", "mt-bench-categories", "--profile", "paper", "--results", tmp_path)
    assert code == 0, err
    assert "mt-bench-categories-paper" in out and "GPU-hours for 4 run(s)" in out


@pytest.mark.slow
def test_quick_study_end_to_end_on_the_testbed(tmp_path):
    """Train the quick grid, run MT-Bench with the oracle judge on every run, rebuild the table and radar."""
    from studies.mt_bench_categories import main

    assert main(["--quick", "--results", str(tmp_path), "--per-category", "2"]) == 0
    out = tmp_path / "mt-bench-categories-quick" / "tables"
    text = (out / "mt_bench_categories.md").read_text()
    for task in ("sort", "reverse", "dedupe", "count"):
        assert f"{task} ↑" in text
    assert (out / "mt_bench_categories.png").stat().st_size > 10_000


def test_a_stand_in_judge_is_named_in_the_caption():
    df = frame()
    assert "stand-in" not in format_mt_bench_categories(df)
    df.loc[df.index[:2], "mt_bench/stand_in_judge"] = "ratings are a hash of the answer"
    text = format_mt_bench_categories(df)
    assert f"WARNING: 2 of {len(df)} runs were rated by a stand-in judge" in text and "a hash of the answer" in text
