"""The main job end to end on the real testbed (slow: builds the testbed unless cached)."""

from __future__ import annotations

import time

import pytest

from studies.engine import run_study
from tests.report_checks import load_study

pytestmark = pytest.mark.slow


def test_reward_conflict_quick_on_the_testbed(tmp_path):
    t0 = time.perf_counter()
    out = run_study("reward-conflict", quick=True, results=tmp_path / "results", progress=False)
    first = time.perf_counter() - t0
    frame = out["frame"]
    assert len(frame) == len(load_study("reward-conflict")["variants"])  # one seed in --quick
    for col in ("margin_accuracy", "oracle_score", "oracle_margin_accuracy", "win_rate_vs_soft_value"):
        assert frame[col].notna().all(), col
    assert frame["oracle_score"].between(0, 1).all()
    sv = frame[frame["label"] == "soft_value"].iloc[0]
    assert sv["win_rate_vs_soft_value"] == 0.5  # against itself: all ties
    md = out["tables"]["md"].read_text()
    assert "soft_value (shuffled Ψ)" in md and "DPO" in md
    t0 = time.perf_counter()
    run_study("reward-conflict", quick=True, results=tmp_path / "results", progress=False)
    assert time.perf_counter() - t0 < min(60.0, first)  # a rerun recomputes nothing
