"""Tables from the results store only: the committed reward-conflict store fixture, read through
`reports.store.store_frame`, gives golden Markdown/LaTeX; `tvkd report` is byte-identical run to run
(tables and figures); ``--compare-paper`` prints the paper's Table 5 beside ours with the Kendall τ an
independent computation gives.

Regenerate the fixture with ``python tests/fixtures/results_store/make_store.py`` and the golden files
after an intended change with ``TVKD_UPDATE_GOLDEN=1 pytest tests/test_report_golden.py``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from itertools import combinations
from pathlib import Path

import pytest

from reports.reward_conflict import write_reward_conflict_tables
from reports.store import frame_from_records, store_frame
from studies import load_spec
from tvkd.cli import main
from tvkd.results import ResultsStore

HERE = Path(__file__).parent
STORE = HERE / "fixtures" / "results_store"
GOLDEN = HERE / "golden"
PAPER_TABLE5 = Path(__file__).parents[1] / "reports" / "paper_data" / "table5.csv"


def test_the_fixture_is_small_and_complete():
    files = [p for p in (STORE / "reward-conflict").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 200_000
    assert len(list((STORE / "reward-conflict").iterdir())) == 30  # 10 variants x 3 seeds


def test_store_frame_has_the_columns_of_a_run_and_its_order():
    sf = store_frame("reward-conflict", STORE)
    frame = sf.frame
    assert not sf.missing and not sf.stale and not sf.duplicates and sf.notices() == []
    spec = load_spec("reward-conflict")
    assert list(zip(frame["label"], frame["seed"])) == [(r.label, r.seed) for r in spec.runs()]  # run order
    for column in ("label", "method", "seed", "run_dir", "record", "margin_accuracy", "oracle_score", "aux",
                   "control", "offset_source", "items.oracle_score", "items.margin_accuracy", "win_rate_vs_soft_value"):
        assert column in frame.columns, column
    row = frame[(frame["label"] == "margin") & (frame["seed"] == 1)].iloc[0]
    run_dir = Path(row["run_dir"])
    assert json.loads((run_dir / "metrics.json").read_text())["oracle_score"] == row["oracle_score"]
    assert row["aux"] == "margin" and row["method"] == "tvkd" and row["control"] == "none"
    # the win rate, from the two runs' outputs.jsonl, prompt by prompt (ties 1/2)
    ref_dir = Path(frame[(frame["label"] == "soft_value") & (frame["seed"] == 1)].iloc[0]["run_dir"])
    mine = [json.loads(line)["oracle"] for line in (run_dir / "outputs.jsonl").read_text().splitlines()]
    theirs = [json.loads(line)["oracle"] for line in (ref_dir / "outputs.jsonl").read_text().splitlines()]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, theirs)) / len(mine)
    assert row["win_rate_vs_soft_value"] == pytest.approx(expected)
    assert row["items.margin_accuracy"] == [json.loads(x)["margin_accuracy"]
                                            for x in (run_dir / "pairs.jsonl").read_text().splitlines()]


def test_store_frame_is_the_frame_of_the_records_in_hand():
    """run_study builds its tables from the store; the frame equals the one the records give directly."""
    spec = load_spec("reward-conflict")
    store = ResultsStore(STORE)
    by = {(r.config["name"], r.config["seed"]): r for r in store.records("reward-conflict")}
    rows = [{**r.info, "label": r.label, "run_dir": str(by[(r.label, r.seed)].run_dir),
             "record": by[(r.label, r.seed)]} for r in spec.runs()]
    direct = frame_from_records(spec.raw, rows).drop(columns=["record"])
    assert direct.equals(store_frame("reward-conflict", STORE).frame.drop(columns=["record"]))


@pytest.mark.parametrize("suffix", ["md", "tex"])
def test_reward_conflict_tables_from_the_store_are_golden(tmp_path, suffix):
    paths = write_reward_conflict_tables(store_frame("reward-conflict", STORE).frame, tmp_path)
    produced = paths[suffix].read_text()
    golden = GOLDEN / f"store_reward_conflict.{suffix}"
    if os.environ.get("TVKD_UPDATE_GOLDEN"):
        golden.write_text(produced)
    assert golden.exists(), f"{golden} is missing; create it with TVKD_UPDATE_GOLDEN=1"
    assert produced == golden.read_text(), f"{golden.name} changed; if intended, rerun with TVKD_UPDATE_GOLDEN=1"


def _report(out: Path, capsys, *extra: str) -> str:
    rc = main(["report", "--study", "reward-conflict", "--results", str(STORE), "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def test_two_report_invocations_are_byte_identical(tmp_path, capsys):
    first = _report(tmp_path / "a", capsys, "--compare-paper")
    second = _report(tmp_path / "b", capsys, "--compare-paper")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["paper_table5.md", "paper_table5.pdf", "paper_table5.png", "reward_conflict.md",
                     "reward_conflict.tex", "runs.csv"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first.replace(str(tmp_path / "a"), "") == second.replace(str(tmp_path / "b"), "")
    for suffix in ("md", "tex"):  # the command writes what the generator writes
        assert (tmp_path / "a" / f"reward_conflict.{suffix}").read_text() == \
            (GOLDEN / f"store_reward_conflict.{suffix}").read_text()


def _tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's τ_b by counting pairs (ties in either ranking counted as the formula says)."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif dx * dy > 0:
            concordant += 1
        else:
            discordant += 1
    return (concordant - discordant) / ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5


def test_compare_paper_prints_table5_beside_ours_with_kendall_tau(tmp_path, capsys):
    out = _report(tmp_path, capsys, "--compare-paper")
    # the paper's cells, read independently of the package's loader
    paper: dict[tuple[str, str], float] = {}
    with open(PAPER_TABLE5, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            paper[(row["name"], row["metric"])] = float(row["value"])
    # ours: means over seeds straight from the fixture's metrics.json
    rows = {"logits": "Logits", "log_prob": "Log Probability", "max": "Max", "margin": "Margin",
            "expectation": "Expectation", "soft_value": "Ours"}
    sums: dict[str, list[float]] = {}
    for run_dir in (STORE / "reward-conflict").iterdir():
        label = run_dir.name.rsplit("-", 1)[0]
        if label in rows:
            sums.setdefault(label, []).append(json.loads((run_dir / "metrics.json").read_text())["margin_accuracy"])
    ours = {label: sum(v) / len(v) for label, v in sums.items()}
    expected = _tau_b([paper[(rows[k], "Margin Acc.")] for k in rows], [ours[k] for k in rows])

    section = out.split("### Margin Acc.")[1].split("###")[0]
    for label, name in rows.items():  # each cell: the published value, ours (x100), ranks
        line = next(x for x in section.splitlines() if x.startswith(f"| {name} "))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[1]) == paper[(name, "Margin Acc.")]
        assert float(cells[2]) == pytest.approx(100 * ours[label], abs=0.005)
    printed = re.search(r"τ = (-?[\d.]+) \(n = (\d+), p = ([\d.]+)\): the paper's ordering of the six aux rewards "
                        r"(is not shown|reproduces|is contradicted \(τ < 0, p < 0.05\)) on the testbed", section)
    assert printed, section
    assert float(printed.group(1)) == pytest.approx(expected, abs=0.005) and printed.group(2) == "6"
    # the MT-bench column adds DPO (from the paper's Table 1) and says how the signs against it compare
    mt = out.split("### MT-bench")[1].split("###")[0]
    assert re.search(r"\| DPO† +\| 3\.700 ", mt) and "n = 7" in mt and "six aux rewards and DPO" in mt
    signs = re.search(r"Signs against DPO: (\d) of (\d) rows whose paired 95% interval against DPO excludes 0 .* "
                      r"(\d) more have an interval that includes 0 and are not compared", mt)
    assert signs and int(signs.group(2)) + int(signs.group(3)) == 6 and int(signs.group(1)) <= int(signs.group(2))
    # at n = 6 a two-sided Kendall test needs |τ| >= 13/15 for p < 0.05: an insignificant τ is "not shown"
    assert "is not shown on the testbed, neither reproduced nor contradicted (at n = 6 a p < 0.05 needs |τ| ≥ 0.867)" \
        in section
    assert "Note on the paper's Margin Acc.: its values (18.29–30.23%) are below the 50%" in section
    assert "DPO's MT-bench is from the paper's Table 1." in out
    assert (tmp_path / "paper_table5.md").read_text() in out


def test_a_missing_and_a_stale_run_are_noticed_and_the_table_still_built(tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(STORE, store)
    runs = store / "reward-conflict"
    shutil.rmtree(next(runs.glob("logits-*")))
    stale = next(runs.glob("max-*"))
    config = (stale / "config.yaml").read_text()
    (stale / "config.yaml").write_text(config.replace("learning_rate: 3.0e-05", "learning_rate: 1.0e-05"))
    sf = store_frame("reward-conflict", store)
    assert len(sf.frame) == 29 and len(sf.missing) == 1 and sf.missing[0][0] == "logits"
    assert len(sf.stale) == 1 and sf.stale[0][0] == "max"
    rc = main(["report", "--study", "reward-conflict", "--results", str(store), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "notice: 1 of 30 runs of reward-conflict have no complete run" in out
    assert "notice: 1 rows come from runs whose config differs" in out and "max (seed" in out
    assert (tmp_path / "out" / "reward_conflict.md").exists()


def test_seeds_run_beyond_the_spec_are_shown(tmp_path):
    store = tmp_path / "store"
    shutil.copytree(STORE, store)
    source = next(p for p in (store / "reward-conflict").glob("dpo-*") if "seed: 1\n" in (p / "config.yaml").read_text())
    extra = store / "reward-conflict" / "dpo-extra"
    shutil.copytree(source, extra)
    (extra / "config.yaml").write_text((source / "config.yaml").read_text().replace("seed: 1\n", "seed: 5\n", 1))
    sf = store_frame("reward-conflict", store)
    assert sorted(set(sf.frame["seed"])) == [0, 1, 2, 5] and len(sf.frame) == 31 and not sf.stale
    assert len(sf.missing) == 9 and {s for _, s in sf.missing} == {5}  # the other variants of seed 5
    assert len(store_frame("reward-conflict", store, seeds=[0, 1, 2]).frame) == 30
