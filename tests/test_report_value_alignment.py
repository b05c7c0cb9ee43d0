"""The value-alignment table (the paper's Table 4): golden files from a committed frame fixture, every cell
against an independent mean / std, the seed-paired Δ value KL, and the `value-alignment` study spec.

Regenerate the golden files after an intended change with
``TVKD_UPDATE_GOLDEN=1 pytest tests/test_report_value_alignment.py`` and review the diff.
"""

from __future__ import annotations

import math
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


# ------------------------------------------------------------------------------------------------------------
# --compare-paper: Table 4's value-KL sign only through the paired interval
# ------------------------------------------------------------------------------------------------------------

def _kl_frame(diffs: list[float]) -> pd.DataFrame:
    """DPO's value KL per seed (std 0.0003) and TVKD's, DPO's plus ``diffs`` on the same seed."""
    dpo = [0.0400, 0.0403, 0.0397]
    rows = []
    for seed, (base, diff) in enumerate(zip(dpo, diffs)):
        rows.append({"label": "dpo", "seed": seed, "value_kl": base, "oracle_score": 0.6})
        rows.append({"label": "tvkd", "seed": seed, "value_kl": round(base + diff, 6), "oracle_score": 0.6})
    return pd.DataFrame(rows)


def _kl_comparison(df: pd.DataFrame):
    from reports.compare import compare_to_paper, format_comparison
    from reports.value_alignment import PAPER_MAPS

    c = compare_to_paper(df, PAPER_MAPS[0], study="value-alignment")
    return next(m for m in c.metrics if m.ours_column == "value_kl"), format_comparison(c)


def _t_interval(diffs: list[float]) -> tuple[float, float]:
    from scipy import stats

    mean, sd, n = statistics.mean(diffs), statistics.stdev(diffs), len(diffs)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


@pytest.mark.parametrize("diffs, verdict", [
    ([0.0001, 0.0004, 0.0007], "not shown"),       # +0.0004, seed std 0.0003, 3 seeds: the interval covers 0
    ([-0.0040, -0.0043, -0.0037], "reproduces"),   # TVKD clearly below DPO, as the paper has it
    ([0.0040, 0.0043, 0.0037], "contradicted"),    # clearly above
])
def test_compare_paper_judges_the_value_kl_sign_only_through_the_paired_interval(diffs, verdict):
    df = _kl_frame(diffs)
    assert statistics.stdev(df.loc[df["label"] == "dpo", "value_kl"]) == pytest.approx(0.0003)
    mc, text = _kl_comparison(df)
    low, high = _t_interval([t - d for t, d in zip(df.loc[df["label"] == "tvkd", "value_kl"],
                                                     df.loc[df["label"] == "dpo", "value_kl"])])
    assert (low < 0 < high) == (verdict == "not shown")
    [row] = mc.sign_rows
    assert row["verdict"] == verdict and row["paper_diff"] < 0  # the paper: TVKD below DPO
    assert row["effect"].low == pytest.approx(low, abs=1e-9) and row["effect"].high == pytest.approx(high, abs=1e-9)
    # the same interval as the table's Δ value KL column
    table = value_alignment_summary(df).set_index("label")
    assert table.loc["tvkd", "effect.value_kl"].low == pytest.approx(low, abs=1e-9)
    # no rank order for the value KL (it would state the sign without the interval), and no "reversed"
    assert mc.cells["ours_rank"].isna().all() and mc.tau is None and "revers" not in text.lower()
    section = text.split("### KL-div. with Teacher Value")[1].split("###")[0]
    assert "paper rank" not in section and f"| {verdict}" in section
    words = {"not shown": "the paper's sign is not shown on the testbed, neither reproduced nor contradicted (the "
                          "95% interval includes 0)",
             "reproduces": "the paper's sign reproduces on the testbed (the 95% interval excludes 0)",
             "contradicted": "the paper's sign is contradicted on the testbed (the 95% interval excludes 0, on the "
                             "other side)"}
    assert words[verdict] in section and f"[{low:+.4f}, {high:+.4f}], paired over 3 seed(s)" in section


def test_one_seed_has_no_interval_so_no_sign():
    mc, text = _kl_comparison(_kl_frame([0.004])[lambda d: d["seed"] == 0])
    assert mc.sign_rows[0]["verdict"] == "not shown" and "no interval: 1 seed(s)" in text
