"""Sensitivity curves (the paper's Figure 4): golden tables and byte-identical figures from a committed
frame fixture, every cell against an independent mean / std, and the `alpha-sensitivity` /
`beta-sensitivity` study specs.

Regenerate the golden files after an intended change with
``TVKD_UPDATE_GOLDEN=1 pytest tests/test_report_sensitivity.py`` and review the diff.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reports.sensitivity import ALPHA, BETA, format_sensitivity, sensitivity_summary, write_sensitivity
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

SWEEPS = {"alpha_sensitivity": ALPHA, "beta_sensitivity": BETA}


records, frame = fixture_records, fixture_frame




@pytest.mark.parametrize("name", sorted(SWEEPS))
@pytest.mark.parametrize("suffix", ["md", "tex"])
def test_golden_tables(tmp_path, name, suffix):
    paths = write_sensitivity(frame(name), tmp_path, SWEEPS[name])
    assert_golden(paths[suffix], f"{name}.{suffix}")


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_figures_are_byte_identical_across_builds(tmp_path, name):
    first = write_sensitivity(frame(name), tmp_path / "a", SWEEPS[name])
    second = write_sensitivity(frame(name), tmp_path / "b", SWEEPS[name])
    assert first["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and first["pdf"].read_bytes()[:5] == b"%PDF-"
    for fmt in ("png", "pdf"):
        assert first[fmt].read_bytes() == second[fmt].read_bytes(), fmt
    assert first["png"].stat().st_size > 10_000


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_cells_equal_an_independent_mean_and_std(name):
    sweep = SWEEPS[name]
    rows = records(name)
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        kind = "DPO" if r["method"] == "dpo" else "TVKD" if r["control"] == "none" else "TVKD (shuffled Ψ)"
        value = "–" if r[sweep.axis] is None else f"{r[sweep.axis]:g}"
        group = groups.setdefault((kind, value), {"oracle": [], "margin": []})
        group["oracle"].append(r["oracle_score"])
        group["margin"].append(r["margin_accuracy"] * 100)
    table = markdown_rows(format_sensitivity(frame(name), "markdown", sweep))
    assert len(table) == len(groups) == 7
    for cells in table:
        group = groups[(cells[0], cells[1])]
        for values, cell, digits in ((group["oracle"], cells[2], 3), (group["margin"], cells[3], 1)):
            assert_cell(cell, values, digits)
        assert cells[-1] == "3"


def test_effects_equal_the_mean_of_per_seed_paired_differences():
    rows = records("alpha_sensitivity")
    dpo = {r["seed"]: r for r in rows if r["method"] == "dpo"}
    tvkd = [r for r in rows if r["method"] == "tvkd" and r["control"] == "none" and r["loss.alpha"] == 0.7]
    expected = np.mean([np.mean([r["items.oracle_score"][p] - dpo[r["seed"]]["items.oracle_score"][p]
                                 for p in r["items.oracle_score"]]) for r in tvkd])
    summary = sensitivity_summary(frame("alpha_sensitivity"), ALPHA)
    effect = summary.set_index("key").loc["tvkd@0.7", "effect.oracle_score"]
    assert effect.estimate == pytest.approx(expected, abs=1e-12) and effect.n_seeds == 3
    assert effect.low <= effect.estimate <= effect.high
    assert summary.set_index("key").loc["dpo", "effect.oracle_score"] is None


def test_rows_order_ranking_and_problems():
    summary = sensitivity_summary(frame("alpha_sensitivity"), ALPHA)
    assert list(summary["key"]) == ["dpo", "tvkd@0.1", "tvkd@0.7", "tvkd@1.5", "shuffled@0.1", "shuffled@0.7",
                                    "shuffled@1.5"]
    assert list(summary["ranked"]) == [True] * 4 + [False] * 3
    df = frame("alpha_sensitivity")
    with pytest.raises(ValueError, match="several runs for one"):
        sensitivity_summary(pd.concat([df, df.iloc[[1]]]), ALPHA)
    stray = pd.concat([df, pd.DataFrame([{"method": "simpo", "control": "none", "seed": 0}])], ignore_index=True)
    with pytest.warns(UserWarning, match="1 runs match no row"):
        sensitivity_summary(stray, ALPHA)
    with pytest.raises(KeyError, match="method"):
        sensitivity_summary(df.drop(columns=["method"]), ALPHA)


def test_generators_are_registered_for_their_studies():
    discover()
    for sweep in (ALPHA, BETA):
        meta = TABLES.meta(sweep.table)
        assert meta["study"] == sweep.study and meta["paper"] == sweep.paper


@pytest.mark.parametrize("study, axis, values", [
    ("alpha-sensitivity", "loss.alpha", [0.1, 0.2, 0.5, 0.7, 1.0, 1.5]),
    ("beta-sensitivity", "loss.value_temperature", [0.1, 0.2, 0.5, 1, 2, 5]),
])
def test_study_spec_expands_the_papers_grid(study, axis, values):
    spec = load_study(study)
    runs = expand_study(spec)
    seeds = spec["seeds"]
    assert len(seeds) >= 3
    assert len(runs) == len(seeds) * (1 + 2 * len(values))  # DPO once, TVKD and its control at every value
    for info, cfg in runs:
        if info["label"] == "dpo":
            assert cfg.loss.name == "dpo"
        else:
            assert cfg.loss.name == "tvkd" and cfg.loss.options[axis.split(".")[1]] == info[axis]
            assert (cfg.loss.options.get("control", "none") == "shuffled") == (info["control"] == "shuffled")
    assert sorted({info[axis] for info, _ in runs if info["label"] != "dpo"}) == values
    quick = expand_study(spec, quick=True)
    assert len(quick) == 5 and {cfg.seed for _, cfg in quick} == {0}


@pytest.mark.parametrize("study", ["alpha-sensitivity", "beta-sensitivity"])
def test_plan_with_the_paper_profile_runs_offline(capsys, tmp_path, study):
    """`tvkd study plan --profile paper` validates the spec and its profile and lists the paper's runs with a
    GPU-hour estimate, without a model, a data set or the testbed."""
    from tests.test_trust import cli

    code, out, err = cli(capsys, "study", "plan", study, "--profile", "paper", "--results", tmp_path)
    assert code == 0, err
    assert f"{study}-paper" in out and "GPU-hours for 13 run(s)" in out
