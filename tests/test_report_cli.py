"""`tvkd report`: one error line (never a traceback) for what a user can fix, `--all` naming what it built and
what had nothing, and `--compare-paper --profile paper` comparing values (ours − paper)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from reports.compare import compare_to_paper, paper_maps_for
from reports.paper import load_table
from studies import STUDIES, load_spec
from tvkd.cli import main
from tvkd.results import ResultsStore

STORE = Path(__file__).parent / "fixtures" / "results_store"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["report", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_study_or_all_is_required(capsys):
    rc, _, err = run(capsys)
    assert rc == 2 and err == "error: give --study <name> (a registered study or a study YAML) or --all\n"


def test_an_unknown_study_is_one_error_line(tmp_path, capsys):
    rc, _, err = run(capsys, "--study", "reward-conflikt", "--results", str(tmp_path))
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "reward-conflict" in err


def test_a_study_without_complete_runs_is_one_error_line(tmp_path, capsys):
    rc, out, err = run(capsys, "--study", "main-table", "--results", str(tmp_path))
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("error: study main-table: no complete run in ") and "tvkd study run main-table" in err
    rc, _, err = run(capsys, "--study", "reward-conflict", "--results", str(STORE), "--profile", "paper")
    assert rc == 1 and "study reward-conflict-paper: no complete run" in err and "--profile paper" in err


def test_all_says_what_it_built_and_what_had_nothing(tmp_path, capsys):
    rc, out, err = run(capsys, "--all", "--results", str(STORE), "--out", str(tmp_path))
    assert rc == 0, err
    assert "built: reward-conflict\n" in out
    nothing = next(line for line in out.splitlines() if line.startswith("nothing built: "))
    for name in STUDIES.names():
        if name != "reward-conflict":
            assert name in nothing
    assert (tmp_path / "reward-conflict" / "reward_conflict.tex").exists()
    rc, out, _ = run(capsys, "--all", "--results", str(tmp_path / "empty"))
    assert rc == 1 and "built: none" in out


def test_every_map_names_cells_the_paper_has():
    """The declared maps point at real rows and metrics of the packaged tables (a typo would compare nothing)."""
    for generator in ("reward_conflict", "main_table"):
        maps = paper_maps_for(generator)
        assert maps, generator
        for pmap in maps:
            table = load_table(pmap.table)
            for col, val in pmap.where.items():
                table = table[table[col] == val]
            borrowed = {pmap.rows[r] for r in pmap.borrow}
            assert set(pmap.rows.values()) - borrowed <= set(table[pmap.row_column]), pmap.name
            assert set(pmap.columns) <= set(table[pmap.column_column]), pmap.name


@pytest.fixture
def paper_store(tmp_path):
    """A reward-conflict --profile paper store: the paper's runs, with MT-Bench and AlpacaEval as `tvkd eval`
    merges them (made-up values)."""
    store = ResultsStore(tmp_path)
    spec = load_spec("reward-conflict", "paper")
    values = {"dpo": (3.6, 30.0), "logits": (3.5, 35.0), "log_prob": (3.4, 31.0), "max": (3.8, 37.0),
              "margin": (3.85, 47.0), "expectation": (3.5, 48.0), "soft_value": (4.0, 50.0),
              "soft_value-shuffled": (3.55, 33.0)}
    for r in spec.runs():
        key = {**r.config.to_dict(), "inputs": {"models.student": "hub:meta-llama/Llama-3.2-1B"}}
        mt, ae = values[r.label]
        with store.start(key, study=r.config.study, name=r.label, seed=r.seed, device="cuda") as h:
            # the paper's MT-bench is the first turn: the comparison reads turn 1, not the mean over both turns
            h.write_metrics({"margin_accuracy": 0.2 + mt / 100, "mt_bench/turn1": mt, "mt_bench/score": mt + 0.3,
                             "alpaca_eval/win_rate": ae,
                             "loss_config": {k: v for k, v in r.config.loss.options.items() if k != "alpha"}})
    return tmp_path


def test_compare_paper_with_the_paper_profile_compares_values(paper_store, tmp_path, capsys):
    rc, out, err = run(capsys, "--study", "reward-conflict", "--profile", "paper", "--results", str(paper_store),
                       "--out", str(tmp_path / "out"), "--compare-paper")
    assert rc == 0, err
    assert "beside reward-conflict-paper (profile paper, mean over 1 seed(s))" in out
    assert "Values are compared: Δ = ours − paper." in out
    mt = out.split("### MT-bench")[1].split("###")[0]
    assert "(ours)" in out.split("### MT-bench")[1].splitlines()[0] and "mt_bench/turn1" in mt
    margin = next(line for line in mt.splitlines() if line.startswith("| Margin "))
    cells = [c.strip() for c in margin.strip("|").split("|")]
    assert float(cells[1]) == 3.90 and float(cells[2]) == 3.85 and cells[3] == "-0.050"
    ae = out.split("### AE")[1]
    soft = next(line for line in ae.splitlines() if line.startswith("| Ours "))
    assert [c.strip() for c in soft.strip("|").split("|")][3] == "+0.000"  # 50.00 both: the baseline itself
    assert re.search(r"in the paper profile", out)
    assert (tmp_path / "out" / "paper_table5.png").exists()


def test_compare_leaves_out_rows_and_columns_the_store_lacks():
    # a frame with two of the rows and one of the metrics
    df = pd.DataFrame({"label": ["logits", "soft_value"], "seed": [0, 0], "margin_accuracy": [0.5, 0.6]})
    (pmap,) = paper_maps_for("reward_conflict")
    c = compare_to_paper(df, pmap, study="reward-conflict")
    assert [m.paper_metric for m in c.metrics] == ["Margin Acc."] and len(c.absent) == 2
    cells = c.metrics[0].cells
    assert list(cells["row"]) == ["logits", "soft_value"] and list(cells["ours"]) == [50.0, 60.0]
    assert c.metrics[0].n == 2 and c.metrics[0].tau == pytest.approx(1.0)


def test_minimal_tau_is_where_scipys_kendall_test_turns_significant():
    from scipy.stats import kendalltau

    from reports.compare import minimal_tau

    # n = 7: 21 pairs; 3 discordant (τ = 15/21 = 0.714) is significant, 4 (τ = 13/21) is not
    assert kendalltau(range(7), [1, 0, 3, 2, 5, 4, 6]).pvalue < 0.05
    assert kendalltau(range(7), [2, 1, 0, 4, 3, 5, 6]).pvalue >= 0.05  # 4 discordant pairs
    assert minimal_tau(7) == pytest.approx(15 / 21) and minimal_tau(6) == pytest.approx(13 / 15)
    assert minimal_tau(4) is None and minimal_tau(3) is None  # even a perfect ordering is not significant


def test_verdict_words_follow_the_evidence():
    from reports.compare import MetricComparison, minimal_tau, verdict

    def words(tau, p, n):
        return verdict(MetricComparison("M", "m", True, pd.DataFrame(), tau=tau, p_value=p, n=n,
                                        tau_needed=minimal_tau(n)), "aux rewards", "on the testbed")

    assert words(0.81, 0.01, 7).endswith("the paper's ordering of the seven aux rewards reproduces on the testbed")
    assert words(-0.81, 0.01, 7).endswith("is contradicted (τ < 0, p < 0.05) on the testbed")
    assert words(-0.14, 0.77, 7).endswith(
        "is not shown on the testbed, neither reproduced nor contradicted (at n = 7 a p < 0.05 needs |τ| ≥ 0.714)")
    assert words(0.67, 0.17, 4).endswith("(at n = 4 even τ = 1 gives p ≥ 0.05)")


def test_signs_are_compared_only_where_the_paired_interval_excludes_zero():
    """Three seeds of margin accuracy per row (no per-item results: a t-interval over the seeds): Max is
    above DPO on every seed by about 0.1 (interval excludes 0, the paper's sign agrees), Logits sits
    around DPO (interval includes 0: not compared)."""
    rows = []
    for seed in range(3):
        rows += [{"label": "dpo", "seed": seed, "oracle_score": 0.50 + 0.01 * seed},
                 {"label": "max", "seed": seed, "oracle_score": 0.60 + 0.01 * seed + 0.001 * (seed == 1)},
                 {"label": "logits", "seed": seed, "oracle_score": 0.50 + 0.01 * seed + (0.02, -0.02, 0.001)[seed]}]
    (pmap,) = paper_maps_for("reward_conflict")
    c = compare_to_paper(pd.DataFrame(rows), pmap, study="reward-conflict")
    (mt,) = [m for m in c.metrics if m.paper_metric == "MT-bench"]
    assert (mt.signs_agree, mt.signs_total, mt.signs_unresolved) == (1, 1, 1)  # Max 3.79 > DPO 3.70 in the paper
