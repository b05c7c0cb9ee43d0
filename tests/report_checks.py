"""What the report generators' tests share: a table's cells read back and compared with an independent
computation from the fixture rows, the committed frame fixtures, golden files, and per-item columns made
consistent with a frame's metrics."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import numpy as np
import pandas as pd

GOLDEN = Path(__file__).parent / "golden"
FRAMES = Path(__file__).parent / "fixtures" / "frames"
#: TVKD_UPDATE_GOLDEN=1 rewrites the golden files from what the generators produce now.
UPDATE = os.environ.get("TVKD_UPDATE_GOLDEN") == "1"
PROMPTS = [f"prompt {i}" for i in range(40)]
N_PAIRS = 500


def fixture_records(name: str) -> list[dict]:
    """The committed frame fixture ``tests/fixtures/frames/<name>.json`` (one record per run)."""
    return json.loads((FRAMES / f"{name}.json").read_text())


def fixture_frame(name: str) -> pd.DataFrame:
    return pd.DataFrame.from_records(fixture_records(name))


def assert_golden(produced: Path, golden_name: str) -> None:
    """A written table equals ``tests/golden/<golden_name>`` byte for byte (rewritten with TVKD_UPDATE_GOLDEN=1)."""
    golden = GOLDEN / golden_name
    if UPDATE:
        golden.write_bytes(Path(produced).read_bytes())
    assert golden.exists(), f"{golden} is missing; create it with TVKD_UPDATE_GOLDEN=1"
    assert Path(produced).read_bytes() == golden.read_bytes(), \
        f"{golden.name} changed; if intended, rerun with TVKD_UPDATE_GOLDEN=1"


def with_items(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Add the per-item columns behind oracle_score and margin_accuracy, consistent with them: per
    prompt the run's score plus a shared prompt difficulty and the run's own noise (both mean 0);
    per test pair an outcome in {0, 0.5, 1}, the easier pairs (shared, plus the run's noise) right,
    summing to margin_accuracy × pairs. A NaN metric gives NaN items."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 0.05, len(PROMPTS))
    difficulty -= difficulty.mean()
    easiness = rng.normal(0, 1, N_PAIRS)
    oracle_items, margin_items = [], []
    for oracle, accuracy in zip(frame["oracle_score"], frame["margin_accuracy"]):
        if math.isnan(oracle):
            oracle_items.append(math.nan)
        else:
            noise = rng.normal(0, 0.02, len(PROMPTS))
            oracle_items.append(dict(zip(PROMPTS, (oracle + difficulty + noise - noise.mean()).tolist())))
        if math.isnan(accuracy):
            margin_items.append(math.nan)
            continue
        right = round(accuracy * N_PAIRS * 2) / 2
        order = np.argsort(-(easiness + rng.normal(0, 1, N_PAIRS)))
        outcome = np.zeros(N_PAIRS)
        outcome[order[:int(right)]] = 1.0
        if right % 1:
            outcome[order[int(right)]] = 0.5  # a tie
        margin_items.append(outcome.tolist())
    return frame.assign(**{"items.oracle_score": oracle_items, "items.margin_accuracy": margin_items})



def assert_cell(cell: str, values: list[float], digits: int) -> None:
    """A "mean ± std" cell equals the sample mean and std of ``values``, to the cell's rounding."""
    mean, std = (float(x) for x in cell.split(" ± "))
    tolerance = 0.5 * 10 ** -digits + 1e-9
    assert abs(mean - statistics.mean(values)) <= tolerance and abs(std - statistics.stdev(values)) <= tolerance, \
        (cell, statistics.mean(values), statistics.stdev(values))


def markdown_rows(text: str) -> list[list[str]]:
    """The body cells of a Markdown table, marks (bold, italic) removed."""
    lines = [line for line in text.splitlines() if line.startswith("|")][2:]
    return [[c.strip().strip("*").strip("_") for c in line.strip("|").split(" | ")] for line in lines]


def load_study(name: str) -> dict:
    """A registered study's YAML as parsed (not checked)."""
    from studies.spec import read_study

    return read_study(name)[0]


def expand_study(spec, *, seeds=None, quick=False, profile=None) -> list:
    """[(run info, run config)] of every run of a study (a name, a path, a mapping or a StudyFile), in run order."""
    from studies.spec import load_spec

    return [(r.info, r.config) for r in load_spec(spec, profile).runs(seeds=seeds, quick=quick)]
