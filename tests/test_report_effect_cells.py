"""The Δ cells of the golden tables against an independent computation: the paired differences from the
fixture frames, the two-way ANOVA by pandas group means, Satterthwaite's df, scipy's t quantile (or
scipy's one-sample t-interval where a seed has one number), and the MDE read back through scipy's
noncentral t (a two-sided t test at the shown MDE has 80% power, to the cell's rounding)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from reports.store import store_frame
from tests.test_report_main_table import main_table_runs
from tests.test_reports import reward_conflict_runs

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
CELL = re.compile(r"^([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\](?:; ([\d.]+))?(?: \(n=\d+\))?$")


def _table(name: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in (GOLDEN / name).read_text().splitlines() if line.startswith("|")]
    split = [[c.strip().strip("*").strip("_") for c in line.strip("|").split(" | ")] for line in lines]
    return split[0], {row[0] if row[0] not in ("action", "state", "control", "control+", "–") else row[1]: row
                      for row in split[2:]}


def _anova(table: pd.DataFrame) -> tuple[float, float, float, float]:
    """(variance of the grand mean, Satterthwaite df) of a complete seeds × items table, by group means."""
    n_seeds, n_items = table.shape
    grand = table.to_numpy().mean()
    seed_means, item_means = table.mean(axis=1), table.mean(axis=0)
    ms_seed = n_items * seed_means.var(ddof=1)
    ms_item = n_seeds * item_means.var(ddof=1)
    resid = table.sub(seed_means, axis=0).sub(item_means, axis=1) + grand
    ms_resid = float((resid ** 2).to_numpy().sum()) / ((n_seeds - 1) * (n_items - 1))
    terms = [(ms_seed, n_seeds - 1)]
    if ms_item > ms_resid:
        terms += [(ms_item, n_items - 1), (-ms_resid, (n_seeds - 1) * (n_items - 1))]
    var = sum(ms for ms, _ in terms) / (n_seeds * n_items)
    df = (n_seeds * n_items * var) ** 2 / sum(ms ** 2 / k for ms, k in terms)
    return grand, var, max(df, min(n_seeds, n_items) - 1)


def _expected(row: dict, ref: dict, keyed: bool) -> tuple[float, float, float, float, float]:
    """(estimate, low, high, se, df) of row − reference from {seed: items}."""
    frames = []
    for seed, items in row.items():
        if seed not in ref or not isinstance(ref[seed], (dict, list)) or not isinstance(items, (dict, list)):
            continue
        a = pd.Series(items if keyed else dict(enumerate(items)), dtype="float64")
        b = pd.Series(ref[seed] if keyed else dict(enumerate(ref[seed])), dtype="float64")
        diff = (a - b).dropna()
        frames.append(pd.DataFrame({"seed": seed, "item": diff.index, "d": diff.to_numpy()}))
    long = pd.concat(frames)
    table = long.pivot(index="seed", columns="item", values="d")
    assert not table.isna().to_numpy().any(), "the fixture tables are complete: every seed scores every item"
    if len(table) == 1:
        ci = stats.ttest_1samp(table.iloc[0], 0).confidence_interval(0.95)
        values = table.iloc[0]
        return values.mean(), ci.low, ci.high, values.std(ddof=1) / math.sqrt(len(values)), len(values) - 1
    grand, var, df = _anova(table)
    half = stats.t.ppf(0.975, df) * math.sqrt(var)
    return grand, grand - half, grand + half, math.sqrt(var), df


def _power(delta: float, se: float, df: float) -> float:
    crit = stats.t.ppf(0.975, df)
    return stats.nct.sf(crit, df, delta / se) + np.nan_to_num(stats.nct.cdf(-crit, df, delta / se))


def _check(cell: str, expected: tuple, scale: float, digits: int) -> None:
    match = CELL.match(cell)
    assert match, cell
    estimate, low, high, se, df = expected
    tolerance = 0.5 * 10 ** -digits + 1e-9
    for shown, value in zip(match.groups()[:3], (estimate, low, high)):
        assert abs(float(shown) - value * scale) <= tolerance, (cell, estimate * scale, low * scale, high * scale)
    if match.group(4) is not None and se < 1e-12:  # seed means that agree exactly: no width, no MDE
        assert float(match.group(4)) == 0 and low == pytest.approx(high), cell
    elif match.group(4) is not None:  # the MDE: 80% power lies between the shown value's rounding ends
        mde = float(match.group(4)) / scale
        step = 0.5 * 10 ** -digits / scale
        assert _power(mde - step, se, df) <= 0.8 <= _power(mde + step, se, df), (cell, se, df)


def _items(df: pd.DataFrame, label_col: str, label: str, metric: str) -> dict:
    part = df[df[label_col] == label]
    return {s: v for s, v in zip(part["seed"], part[f"items.{metric}"]) if isinstance(v, (dict, list))}


def _check_item_table(name: str, df: pd.DataFrame, label_col: str, names: dict[str, str], reference: str) -> int:
    header, rows = _table(name)
    checked = 0
    for column, title in enumerate(header):
        if not title.startswith("Δ "):
            continue
        metric, scale, digits = (("oracle_score", 1, 3) if title.startswith("Δ oracle")
                                 else ("margin_accuracy", 100, 1))
        ref = _items(df, label_col, reference, metric)
        for label, shown_name in names.items():
            cell = rows[shown_name][column]
            mine = _items(df, label_col, label, metric)
            if not mine or not set(mine) & set(ref):
                assert cell == "–", (name, label, cell)
                continue
            _check(cell, _expected(mine, ref, keyed=metric == "oracle_score"), scale, digits)
            checked += 1
    return checked


def test_store_reward_conflict_cells_match_an_independent_computation():
    frame = store_frame("reward-conflict", HERE / "fixtures" / "results_store").frame
    names = {"logits": "logits", "log_prob": "log_prob", "max": "max", "margin": "margin",
             "expectation": "expectation", "soft_value": "soft_value", "oracle-gap": "oracle gap (positive control)",
             "soft_value-shuffled": "soft_value (shuffled Ψ)"}
    assert _check_item_table("store_reward_conflict.md", frame, "label", names, "dpo") == 16


def test_main_table_cells_match_an_independent_computation():
    from reports.main_table import ROWS

    names = {r.label: r.name for r in ROWS if r.label not in ("dpo", "gkd", "dckd")}
    frame = main_table_runs()
    frame.loc[frame["oracle_score"].isna(), "items.oracle_score"] = math.nan  # the table pairs scored runs only
    assert _check_item_table("main_table.md", frame, "label", names, "dpo") >= 20


def test_reward_conflict_cells_match_an_independent_computation():
    """The synthetic Table 5 frame: DPO has one seed, so every Δ is the one-seed t-interval over items."""
    frame = reward_conflict_runs()
    header, rows = _table("reward_conflict.md")
    column = next(i for i, t in enumerate(header) if t.startswith("Δ oracle"))
    cell = rows["logits"][column]
    frame["row"] = [m if m == "dpo" else a for m, a in zip(frame["method"], frame["aux"])]
    ref = _items(frame, "row", "dpo", "oracle_score")
    mine = _items(frame[frame["offset_source"] == "teacher"], "row", "logits", "oracle_score")
    _check(cell, _expected(mine, ref, keyed=True), 1, 3)


@pytest.mark.parametrize(("fixture", "golden", "score", "label_col", "digits"), [
    ("mt_bench_categories.json", "mt_bench_categories.md", "mt_bench/score", "label", 2),
])
def test_seed_level_cells_are_scipys_one_sample_t_intervals(fixture, golden, score, label_col, digits):
    frame = pd.DataFrame.from_records(json.loads((HERE / "fixtures" / "frames" / fixture).read_text()))
    _, rows = _table(golden)
    from reports.mt_bench_categories import METHODS

    ref = frame[frame[label_col] == "dpo"].set_index("seed")[score]
    checked = 0
    for label, (shown, _) in METHODS.items():
        if label == "dpo" or label not in set(frame[label_col]):
            continue
        diffs = (frame[frame[label_col] == label].set_index("seed")[score] - ref).dropna()
        ci = stats.ttest_1samp(diffs, 0).confidence_interval(0.95)
        match = CELL.match(rows[shown][-2])
        tolerance = 0.5 * 10 ** -digits + 1e-9
        assert all(abs(float(a) - b) <= tolerance for a, b in zip(match.groups()[:3], (diffs.mean(), ci.low, ci.high)))
        checked += 1
    assert checked == 3
