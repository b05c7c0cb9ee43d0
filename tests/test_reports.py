"""Table generation: summaries, ranking marks (ties, NaN), escaping, and the reward-conflict golden files.

Regenerate the golden files after an intended change with ``TVKD_UPDATE_GOLDEN=1 pytest tests/test_reports.py``
and review the diff.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pandas as pd
import pytest

from reports.reward_conflict import (
    ROWS,
    format_reward_conflict,
    reward_conflict_summary,
    write_reward_conflict_tables,
)
from reports.tables import TABLES, MetricSpec, discover, format_table, latex_escape, summarize
from tests.report_checks import with_items

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TVKD_UPDATE_GOLDEN") == "1"



def reward_conflict_runs() -> pd.DataFrame:
    """A small fixed study: three seeds for most rows, `max` missing entirely, one DPO seed, a NaN
    metric, a displayed tie for the best oracle score, the positive control, per-item results (none
    for the shuffled control), and extra columns that must be ignored."""
    values = {  # aux: (margin accuracy, oracle score, win rate) at seed 0; seeds 1, 2 add offsets
        "logits": (0.612, 0.481, 0.402),
        "log_prob": (0.634, 0.512, 0.455),
        "margin": (0.651, 0.5301, 0.468),
        "expectation": (0.648, 0.5303, 0.471),
        "soft_value": (0.672, 0.5302, 0.5),
    }
    rows = []
    for aux, (acc, oracle, win) in values.items():
        for seed in (0, 1, 2):
            rows.append({"method": "tvkd", "aux": aux, "control": "none", "offset_source": "teacher", "seed": seed,
                         "margin_accuracy": acc + 0.01 * seed, "oracle_score": oracle + 0.001 * (seed - 1),
                         "win_rate_vs_soft_value": win + 0.02 * (seed - 1), "run_dir": f"/r/{aux}-{seed}",
                         "config.training.alpha": 0.7})
    rows[3]["oracle_score"] = math.nan  # log_prob seed 0: the oracle evaluation was not run
    for seed in (0, 1, 2):  # the positive control: offsets = the oracle's score gaps
        rows.append({"method": "tvkd", "aux": "soft_value", "control": "none",
                     "offset_source": "data:oracle_chosen,oracle_rejected", "seed": seed,
                     "margin_accuracy": 0.74 + 0.01 * seed, "oracle_score": 0.561 + 0.002 * (seed - 1),
                     "win_rate_vs_soft_value": 0.58 + 0.01 * (seed - 1), "run_dir": f"/r/oracle-gap-{seed}"})
    rows.append({"method": "dpo", "aux": None, "control": "none", "offset_source": None, "seed": 0,
                 "margin_accuracy": 0.605, "oracle_score": 0.47, "win_rate_vs_soft_value": 0.38, "run_dir": "/r/dpo-0"})
    for seed in (0, 1):
        rows.append({"method": "tvkd", "aux": "soft_value", "control": "shuffled", "seed": seed,
                     "margin_accuracy": 0.70 + 0.02 * seed, "oracle_score": 0.49, "win_rate_vs_soft_value": 0.44,
                     "run_dir": f"/r/shuffled-{seed}"})  # no offset_source recorded: read as "teacher"
    frame = with_items(pd.DataFrame(rows))
    shuffled = frame["control"] == "shuffled"  # evaluated before per-item results were kept
    frame.loc[shuffled, "items.oracle_score"] = math.nan
    frame.loc[shuffled, "items.margin_accuracy"] = math.nan
    return frame


@pytest.mark.parametrize("suffix", ["md", "tex"])
def test_reward_conflict_golden(tmp_path, suffix):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fixed study is clean: no warnings expected
        paths = write_reward_conflict_tables(reward_conflict_runs(), tmp_path / "tables")
    assert set(paths) == {"md", "tex"} and all(p.parent == tmp_path / "tables" for p in paths.values())
    produced = paths[suffix].read_text()
    golden = GOLDEN / f"reward_conflict.{suffix}"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(produced)
    assert golden.exists(), f"{golden} is missing; create it with TVKD_UPDATE_GOLDEN=1"
    assert produced == golden.read_text(), f"{golden.name} changed; if intended, rerun with TVKD_UPDATE_GOLDEN=1"


def test_reward_conflict_keeps_every_row_and_marks_missing_ones():
    summary = reward_conflict_summary(reward_conflict_runs())
    assert summary["key"].tolist() == [r.key for r in ROWS]
    by_key = summary.set_index("key")
    assert by_key.loc["max", "n"] == 0 and math.isnan(by_key.loc["max", "margin_accuracy.mean"])
    assert by_key.loc["dpo", "n"] == 1 and by_key.loc["dpo", "margin_accuracy.std"] == 0.0
    assert by_key.loc["log_prob", "oracle_score.n"] == 2 and by_key.loc["log_prob", "n"] == 3
    md = format_reward_conflict(reward_conflict_runs(), "markdown")
    max_line = next(line for line in md.splitlines() if "| max " in line)
    assert max_line.count("–") == 5 and max_line.rstrip(" |").endswith("0")  # 3 metrics, 2 Δ columns
    assert "(n=2)" in md  # log_prob's oracle score rests on two seeds, not three
    assert "seeds 0, 1, 2" in md


def test_reward_conflict_from_an_empty_study_still_has_all_rows():
    empty = reward_conflict_runs().iloc[0:0]
    md = format_reward_conflict(empty, "markdown")
    assert sum(line.startswith("| ") for line in md.splitlines()) == 2 + len(ROWS)  # header, rule, rows
    assert "**" not in md and "seeds (none)" in md


def test_reward_conflict_rejects_two_runs_of_one_seed():
    df = reward_conflict_runs()
    df = pd.concat([df, df.iloc[[0]]], ignore_index=True)
    with pytest.raises(ValueError, match="one configuration per seed"):
        reward_conflict_summary(df)


def test_reward_conflict_warns_about_runs_it_cannot_place_and_absent_metrics():
    df = reward_conflict_runs().drop(columns=["win_rate_vs_soft_value"])
    df = pd.concat([df, pd.DataFrame([{"method": "simpo", "aux": None, "control": "none", "seed": 0}])])
    with pytest.warns(UserWarning) as caught:
        md = format_reward_conflict(df, "markdown")
    messages = " ".join(str(w.message) for w in caught)
    assert "win_rate_vs_soft_value" in messages and "method='simpo'" in messages
    assert "simpo" not in md.split("\n\n")[0]


def test_reward_conflict_requires_method_and_seed():
    with pytest.raises(KeyError, match="seed"):
        reward_conflict_summary(reward_conflict_runs().drop(columns=["seed"]))


def _rows(table: str) -> dict[str, list[str]]:
    """Row name -> its cells after Type and Name in a reward-conflict Markdown table."""
    out = {}
    for line in table.split("\n\n")[0].splitlines()[2:]:
        parts = [p.strip() for p in line.strip("|").split("|")]
        out[parts[1]] = parts[2:]
    return out


POSITIVE = "oracle gap (positive control)"


def test_the_positive_control_is_its_own_row_and_not_ranked():
    df = reward_conflict_runs()
    keys = [r.key for r in ROWS]
    assert keys.index("oracle_gap") == keys.index("soft_value") + 1 and keys.index("ceiling") == keys.index("oracle_gap") + 1
    assert keys.index("dpo") == keys.index("ceiling") + 1
    by_key = reward_conflict_summary(df).set_index("key")
    assert by_key.loc["oracle_gap", "Type"] == "control+" and by_key.loc["oracle_gap", "Name"] == POSITIVE
    assert by_key.loc["oracle_gap", "n"] == 3
    assert by_key.loc["oracle_gap", "margin_accuracy.mean"] == pytest.approx(0.75)
    # the teacher rows keep only teacher-offset runs (a missing offset_source reads as "teacher")
    assert by_key.loc["soft_value", "n"] == 3
    assert by_key.loc["soft_value", "margin_accuracy.mean"] == pytest.approx(0.682)
    assert by_key.loc["soft_value_shuffled", "n"] == 2
    # the highest values of the table, yet never marked: a control, not a method
    cells = _rows(format_reward_conflict(df, "markdown"))
    assert cells[POSITIVE][1:4] == ["75.0 ± 1.0", "0.561 ± 0.002", "58.0 ± 1.0"]
    lines = format_reward_conflict(df, "latex").splitlines()
    line = next(x for x in lines if x.startswith("control+ & oracle gap"))
    assert r"\textbf" not in line and r"\underline" not in line
    assert lines[lines.index(line) - 1] == r"\midrule"


def test_a_data_offset_run_of_another_kind_is_no_row():
    odd = {"method": "tvkd", "aux": "soft_value", "control": "shuffled", "seed": 0,
           "offset_source": "data:oracle_chosen,oracle_rejected", "margin_accuracy": 0.9, "oracle_score": 0.9}
    df = pd.concat([reward_conflict_runs(), pd.DataFrame([odd])], ignore_index=True)
    with pytest.warns(UserWarning, match="offset_source='data:oracle_chosen,oracle_rejected'"):
        summary = reward_conflict_summary(df)
    assert summary.set_index("key").loc["soft_value_shuffled", "n"] == 2


def test_effect_columns_against_dpo():
    md = format_reward_conflict(reward_conflict_runs(), "markdown")
    header = md.splitlines()[0]
    assert (header.index("Win rate") < header.index("Δ margin acc. vs DPO (pts) [95% CI]")
            < header.index("Δ oracle vs DPO [95% CI]") < header.rindex("| n"))
    cells = _rows(md)
    # DPO has one seed: every effect rests on seed 0 alone, and says so
    assert cells["logits"][4].startswith("+0.7 [") and cells["logits"][4].endswith("(n=1)")
    assert cells["logits"][5].startswith("+0.010 [")  # 0.480 − 0.470 at seed 0
    assert cells["DPO"][4:6] == ["–", "–"]  # the reference itself
    assert cells["log_prob"][5] == "–"  # its seed-0 oracle score is missing: nothing pairs with DPO
    assert cells["soft_value (shuffled Ψ)"][4:6] == ["–", "–"]  # no per-item results
    assert cells["max"][4:6] == ["–", "–"]  # no runs
    assert not any(c.startswith(("**", "_")) for row in cells.values() for c in row[4:6])  # marks: mean ± std only
    caption = md.split("\n\n")[-1]
    assert "Δ vs DPO: the paired difference" in caption
    assert "With 1 seed (evaluation noise only) it is " in caption and "(noncentral t)" in caption
    assert caption.rstrip().endswith("are below the detection limit (80% power, 5% level).")
    assert "crossed seed × item random-effects model" in caption
    tex = format_reward_conflict(reward_conflict_runs(), "latex")
    assert r"$\Delta$ oracle vs DPO [95\% CI]" in tex and r"detection limit (80\% power, 5\% level)" in tex


def test_effect_columns_against_another_reference():
    md = format_reward_conflict(reward_conflict_runs(), "markdown", reference="soft_value")
    assert "Δ oracle vs soft_value [95% CI]" in md and "vs DPO" not in md
    cells = _rows(md)
    assert cells["soft_value"][4:6] == ["–", "–"]
    assert not cells["logits"][5].endswith(")")  # three paired seeds, as many as the row's runs
    assert cells["log_prob"][5].endswith("(n=2)")
    assert "(n=" not in cells["DPO"][5]  # one paired seed, DPO's only run
    assert "With 1–3 seeds it is " in md
    with pytest.raises(ValueError, match="no table row"):
        format_reward_conflict(reward_conflict_runs(), "markdown", reference="ipo")


def test_without_per_item_results_the_effect_columns_are_empty():
    df = reward_conflict_runs().drop(columns=["items.oracle_score", "items.margin_accuracy"])
    with pytest.warns(UserWarning, match=r"no 'items\.\w+' column") as caught:
        md = format_reward_conflict(df, "markdown")
    messages = " ".join(str(w.message) for w in caught)
    assert "'items.oracle_score'" in messages and "'items.margin_accuracy'" in messages
    assert all(row[4:6] == ["–", "–"] for row in _rows(md).values())
    assert "detection limit" not in md


def test_reward_conflict_is_registered():
    assert "reward_conflict" in discover()
    meta = TABLES.meta("reward_conflict")
    assert meta["study"] == "reward-conflict" and meta["paper"] == "Table 5"
    assert TABLES.get("reward_conflict") is write_reward_conflict_tables


# ------------------------------------------------------------------------------- summarize


def test_summarize_mean_std_and_counts():
    df = pd.DataFrame({"method": ["a", "a", "a", "b", "c", "c"], "seed": [0, 1, 2, 0, 0, 1],
                       "acc": [0.5, 0.7, math.nan, 0.9, math.nan, math.nan], "extra": list("xyzuvw")})
    s = summarize(df, by=["method"], metrics=["acc"]).set_index("method")
    assert s.loc["a", "n"] == 3 and s.loc["a", "acc.n"] == 2
    assert s.loc["a", "acc.mean"] == pytest.approx(0.6) and s.loc["a", "acc.std"] == pytest.approx(0.1414213562)
    assert s.loc["b", "acc.std"] == 0.0 and s.loc["b", "acc.n"] == 1  # one seed: std 0, shown as such
    assert math.isnan(s.loc["c", "acc.mean"]) and math.isnan(s.loc["c", "acc.std"]) and s.loc["c", "acc.n"] == 0
    assert list(s.index) == ["a", "b", "c"]  # order of first appearance


def test_summarize_keeps_missing_group_keys_and_checks_columns():
    df = pd.DataFrame({"aux": ["x", None, None], "acc": [1.0, 2.0, 4.0]})
    s = summarize(df, by=["aux"], metrics=["acc"])
    assert len(s) == 2 and s["acc.mean"].tolist() == [1.0, 3.0]
    with pytest.raises(KeyError, match="nope"):
        summarize(df, by=["aux"], metrics=["nope"])
    with pytest.raises(TypeError, match="acc"):
        summarize(pd.DataFrame({"g": [1], "acc": ["high"]}), by=["g"], metrics=["acc"])
    assert summarize(df.iloc[0:0], by=["aux"], metrics=["acc"]).empty


# ------------------------------------------------------------------------ ranking and format


def _summary(values: dict[str, list[float]]) -> pd.DataFrame:
    rows = [{"name": name, "seed": i, "score": v} for name, vs in values.items() for i, v in enumerate(vs)]
    return summarize(pd.DataFrame(rows), by=["name"], metrics=["score"])


def _cells(table: str) -> dict[str, str]:
    """name -> score cell of a Markdown table."""
    out = {}
    for line in table.splitlines()[2:]:
        if line.startswith("| "):
            parts = [p.strip() for p in line.strip("|").split("|")]
            out[parts[0]] = parts[1]
    return out


SCORE = {"score": MetricSpec("Score", digits=2)}


def test_best_is_bold_second_is_italic():
    cells = _cells(format_table(_summary({"a": [0.5], "b": [0.9], "c": [0.7], "d": [0.1]}), metrics=SCORE,
                                row_label_cols=["name"]))
    assert cells == {"b": "**0.90 ± 0.00**", "c": "_0.70 ± 0.00_", "a": "0.50 ± 0.00", "d": "0.10 ± 0.00"}


def test_ties_share_the_mark_and_rank_on_displayed_values():
    # 0.9001 and 0.8999 both read 0.90: they tie for best; the next distinct value is second.
    cells = _cells(format_table(_summary({"a": [0.9001], "b": [0.8999], "c": [0.7], "d": [0.7], "e": [0.1]}),
                                metrics=SCORE, row_label_cols=["name"]))
    assert cells["a"].startswith("**") and cells["b"].startswith("**")
    assert cells["c"].startswith("_") and cells["d"].startswith("_") and cells["e"] == "0.10 ± 0.00"


def test_lower_is_better_and_percent():
    spec = {"score": MetricSpec("Loss", higher_is_better=False, digits=1, percent=True)}
    table = format_table(_summary({"a": [0.25, 0.35], "b": [0.1], "c": [0.5]}), metrics=spec, row_label_cols=["name"])
    cells = _cells(table)
    assert cells == {"a": "_30.0 ± 7.1_", "b": "**10.0 ± 0.0**", "c": "50.0 ± 0.0"}
    assert "Loss ↓" in table


def test_missing_values_show_a_dash_and_are_never_ranked():
    s = _summary({"a": [math.nan], "b": [0.2], "c": [0.4]})
    cells = _cells(format_table(s, metrics=SCORE, row_label_cols=["name"]))
    assert cells == {"a": "–", "b": "_0.20 ± 0.00_", "c": "**0.40 ± 0.00**"}
    tex = format_table(s, metrics=SCORE, row_label_cols=["name"], fmt="latex")
    assert "a & -- & 1 \\\\" in tex


def test_ranking_needs_two_candidates_and_respects_the_ranked_flags():
    single = _cells(format_table(_summary({"a": [0.5], "b": [math.nan]}), metrics=SCORE, row_label_cols=["name"]))
    assert single == {"a": "0.50 ± 0.00", "b": "–"}
    s = _summary({"a": [0.5], "b": [0.9], "ctrl": [0.99]})
    cells = _cells(format_table(s, metrics=SCORE, row_label_cols=["name"], ranked=[True, True, False]))
    assert cells == {"a": "_0.50 ± 0.00_", "b": "**0.90 ± 0.00**", "ctrl": "0.99 ± 0.00"}
    plain = _cells(format_table(s, metrics=SCORE, row_label_cols=["name"], highlight=False))
    assert not any("*" in c or "_" in c for c in plain.values())
    with pytest.raises(ValueError, match="flags"):
        format_table(s, metrics=SCORE, row_label_cols=["name"], ranked=[True])


def test_latex_is_booktabs_with_escaped_text_and_marks():
    s = _summary({"soft_value & co": [0.9, 0.8], "50% #1": [0.5], "x": [0.1]})
    tex = format_table(s, metrics={"score": MetricSpec("Win rate vs soft_value (%)")}, row_label_cols={"name": "Name"},
                       fmt="latex", caption="Mean ± std; β_V = 2", label="tab:t", rules_before={2})
    lines = tex.splitlines()
    assert lines[:5] == [r"\begin{table}[t]", r"\centering", r"\caption{Mean $\pm$ std; $\beta$\_V = 2}",
                         r"\label{tab:t}", r"\begin{tabular}{lrr}"]
    assert lines[5:8] == [r"\toprule", r"Name & Win rate vs soft\_value (\%) $\uparrow$ & $n$ \\", r"\midrule"]
    assert r"soft\_value \& co & \textbf{0.85 $\pm$ 0.07} & 2 \\" in lines
    assert r"50\% \#1 & \underline{0.50 $\pm$ 0.00} & 1 \\" in lines
    assert lines[lines.index(r"x & 0.10 $\pm$ 0.00 & 1 \\") - 1] == r"\midrule"
    assert lines[-3:] == [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    assert latex_escape("a\\b~^{}") == r"a\textbackslash{}b\textasciitilde{}\textasciicircum{}\{\}"


def test_markdown_escapes_pipes_and_notes_partial_counts():
    df = pd.DataFrame({"name": ["a|b", "a|b", "c"], "score": [0.5, math.nan, 0.2], "other": [1.0, 2.0, 3.0]})
    s = summarize(df, by=["name"], metrics=["score", "other"])
    table = format_table(s, metrics={**SCORE, "other": MetricSpec("Other", digits=0)}, row_label_cols=["name"],
                         caption="Caption | here")
    assert r"a\|b" in table and "0.50 ± 0.00 (n=1)" in table and table.endswith("Caption \\| here\n")
    header, rule = table.splitlines()[:2]
    assert header.split("|")[1:-1][-1].strip() == "n" and rule.startswith("| :--") and rule.endswith(": |")
    with pytest.raises(ValueError, match="fmt"):
        format_table(s, metrics=SCORE, row_label_cols=["name"], fmt="html")
    with pytest.raises(KeyError, match="missing"):
        format_table(s, metrics={"absent": MetricSpec("A")}, row_label_cols=["name"])


def test_extra_columns_hold_preformatted_text():
    s = _summary({"a": [0.5], "b|x": [0.9], "c": [0.7]})
    s["delta"] = ["+0.1 [0, 0.2]", None, "50% & up"]
    plain = format_table(s, metrics=SCORE, row_label_cols=["name"])
    assert format_table(s, metrics=SCORE, row_label_cols=["name"], extra_cols=()) == plain
    table = format_table(s, metrics=SCORE, row_label_cols=["name"], extra_cols={"delta": "Δ | vs a"})
    header, rule, *rows = table.splitlines()
    assert r"| Δ \| vs a " in header and header.index("Score") < header.index("Δ") < header.rindex("| n")
    assert rule.endswith(": |") and rule.count(":") == 4  # the extra column is right-aligned like a metric
    assert "| +0.1 [0, 0.2] " in rows[0] and "| – " in rows[1] and "| 50% & up " in rows[2]
    assert "**" not in rows[0] and rows[1].count("**") == 2  # the marks stay on the metric
    tex = format_table(s, metrics=SCORE, row_label_cols=["name"], extra_cols=["delta"], fmt="latex")
    assert r"name & Score $\uparrow$ & delta & $n$ \\" in tex
    assert r"c & \underline{0.70 $\pm$ 0.00} & 50\% \& up & 1 \\" in tex
    assert r"b|x & \textbf{0.90 $\pm$ 0.00} & -- & 1 \\" in tex
    with pytest.raises(KeyError, match="absent"):
        format_table(s, metrics=SCORE, row_label_cols=["name"], extra_cols=["absent"])


def test_a_dpo_run_on_oracle_labels_is_the_ceiling_row_not_dpo():
    ceiling = [{"method": "dpo", "control": "ceiling", "seed": s, "margin_accuracy": 0.9, "oracle_score": 0.7}
               for s in (0, 1, 2)]
    df = pd.concat([reward_conflict_runs(), pd.DataFrame(ceiling)], ignore_index=True)
    by_key = reward_conflict_summary(df).set_index("key")
    assert by_key.loc["ceiling", "n"] == 3 and by_key.loc["ceiling", "oracle_score.mean"] == pytest.approx(0.7)
    plain = reward_conflict_summary(reward_conflict_runs()).set_index("key")
    assert by_key.loc["dpo", "n"] == plain.loc["dpo", "n"]  # DPO's row keeps only control-free DPO runs
    assert by_key.loc["dpo", "oracle_score.mean"] == pytest.approx(plain.loc["dpo", "oracle_score.mean"])
    lines = format_reward_conflict(df, "latex").splitlines()
    line = next(x for x in lines if x.startswith("control+ & DPO on oracle labels"))
    assert r"\textbf" not in line and r"\underline" not in line  # a control: never ranked
