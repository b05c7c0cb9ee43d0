"""Captions state the settings the runs recorded (reports/settings.py), not fixed text: the study frame's
``config/...`` columns come from each run's config and resolved loss config; every generator's caption follows
them (a value changed in the frame changes the caption; runs that disagree are named), and a frame without them
(an older store, a hand-made frame) says nothing about a setting rather than a number."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports.grid import write_grid_tables
from reports.main_table import format_main_table
from reports.model_ablation import format_model_ablation
from reports.mt_bench_categories import format_mt_bench_categories
from reports.reward_conflict import format_reward_conflict
from reports.sensitivity import ALPHA, BETA, format_sensitivity
from reports.settings import ALPHA as ALPHA_COL
from reports.settings import BETA as BETA_COL
from reports.settings import (
    CONFIG,
    EPOCHS,
    LEARNING_RATE,
    VALUE_TEMPERATURE,
    config_columns,
    describe,
    settings_sentence,
)
from reports.store import store_frame
from reports.teacher_signal_dial import format_dial
from reports.teacher_type import format_teacher_type
from reports.value_alignment import format_value_alignment
from reports.value_analysis import format_value_analysis
from studies.spec import parse_spec
from tests.report_checks import fixture_frame

STORE = Path(__file__).parent / "fixtures" / "results_store"


# ------------------------------------------------------------------------------------------------------------
# the frame's columns, from what a run recorded
# ------------------------------------------------------------------------------------------------------------

def test_config_columns_prefer_the_resolved_loss_config_and_leave_out_what_no_run_recorded():
    config = {"loss": {"name": "tvkd", "options": {"aux": "soft_value", "alpha": 0.5}},
              "train": {"learning_rate": 1e-5, "num_train_epochs": 3}, "cache": {"value_temperatures": [2.0, 5.0]},
              "testbed": {"dpo_lr": 1e-4}}
    resolved = {"aux": "soft_value", "alpha": 0.5, "beta": 0.1, "value_temperature": 5.0, "gamma": 1.0}
    cols = config_columns(config, resolved)
    assert cols[ALPHA_COL] == 0.5 and cols[BETA_COL] == 0.1 and cols[VALUE_TEMPERATURE] == 5.0
    assert cols[LEARNING_RATE] == 1e-5 and cols[EPOCHS] == 3 and cols[CONFIG + "loss.name"] == "tvkd"
    assert cols[CONFIG + "cache.value_temperatures"] == (2.0, 5.0) and cols[CONFIG + "testbed.dpo_lr"] == 1e-4
    # without the resolved config only what config.yaml states: no default filled in
    stated = config_columns(config, None)
    assert stated[ALPHA_COL] == 0.5 and BETA_COL not in stated and VALUE_TEMPERATURE not in stated
    # β_V = β when the loss ties them; none when the offsets hold no soft value
    assert config_columns(config, {**resolved, "tie_temperature": True})[VALUE_TEMPERATURE] == 0.1
    assert VALUE_TEMPERATURE not in config_columns(config, {**resolved, "aux": "logits"})
    assert VALUE_TEMPERATURE not in config_columns(config, {**resolved, "offset_source": "data:oracle_gap"})
    # a run that only evaluates trains nothing: only the loss options that set the evaluation
    evaluated = config_columns({**config, "eval_only": True}, resolved)
    assert ALPHA_COL not in evaluated and BETA_COL not in evaluated and LEARNING_RATE not in evaluated
    assert evaluated[VALUE_TEMPERATURE] == 5.0
    assert config_columns(None, None) == {}


def test_the_store_frame_holds_each_runs_recorded_settings():
    frame = store_frame("reward-conflict", STORE).frame
    for _, row in frame.iterrows():
        recorded = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())["loss_config"]
        assert row[BETA_COL] == recorded["beta"]
        if "alpha" in recorded:
            assert row[ALPHA_COL] == recorded["alpha"]
        else:
            assert pd.isna(row[ALPHA_COL])
        assert row[LEARNING_RATE] == 3e-5 and row[EPOCHS] == 2
    soft = frame[frame["label"] == "soft_value"]
    assert set(soft[VALUE_TEMPERATURE]) == {2.0}
    assert frame.loc[frame["label"] == "logits", VALUE_TEMPERATURE].isna().all()  # β_V plays no part there


# ------------------------------------------------------------------------------------------------------------
# how a caption writes them
# ------------------------------------------------------------------------------------------------------------

def _df(values: list[object]) -> pd.DataFrame:
    return pd.DataFrame({ALPHA_COL: values})


def test_describe_says_one_value_once_names_the_rows_where_they_differ_and_the_runs_that_disagree():
    assert describe(_df([0.7, 0.7, 0.7]), ALPHA_COL, ["A", "A", "B"]) == "α 0.7"
    assert describe(_df([None, 0.7, 0.7]), ALPHA_COL, ["DPO", "A", "B"]) == "α 0.7, none for DPO"
    assert describe(_df([None, None, None, 0.7, 0.7, 0.7, 0.7]), ALPHA_COL, ["DPO", "SimPO", "C", "A", "B", "D", "E"]) \
        == "α 0.7, none for DPO, SimPO and C"
    assert describe(_df([None, None, 0.7]), ALPHA_COL, ["DPO", "SFT", "B"]) == "α 0.7 (B)"
    assert describe(_df([0.1, 0.1, 0.01, 2.0]), BETA_COL.replace("beta", "alpha"), ["A", "B", "C", "D"]) == \
        "α 0.01 (C), 2 (D), 0.1 (the other rows)"
    assert describe(_df([0.5, 0.7, 0.7]), ALPHA_COL, ["T", "T", "T"]) == \
        "α 0.5 (T: 1 of 3 runs), 0.7 (T: 2 of 3 runs)"
    assert describe(_df([0.7, 0.7]), ALPHA_COL, [None, "A"]) == "α 0.7"  # a run the table does not show
    assert describe(_df([None, None]), ALPHA_COL, ["A", "B"]) is None
    assert describe(pd.DataFrame({"x": [1]}), ALPHA_COL, ["A"]) is None
    assert settings_sentence(pd.DataFrame({"x": [1]}), ["A"]) == ""
    assert describe(pd.DataFrame({LEARNING_RATE: [3e-5]}), LEARNING_RATE, ["A"]) == "learning rate 3e-05"


# ------------------------------------------------------------------------------------------------------------
# every generator follows the frame
# ------------------------------------------------------------------------------------------------------------

def _quiet(fn, df: pd.DataFrame) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(df)


def _set(df: pd.DataFrame, column: str, value: object, where: pd.Series | None = None) -> pd.DataFrame:
    df = df.copy()
    where = df[column].notna() if where is None else where
    df[column] = df[column].astype(object)
    df.loc[where, column] = value
    return df


def _without_config(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if c.startswith(CONFIG)])


def _main_table_frame() -> pd.DataFrame:
    rows = []
    for seed in (0, 1, 2):
        for label, loss in (("dpo", {"beta": 0.1}), ("simpo", {"beta": 2.0}),
                            ("tvkd", {"alpha": 0.7, "beta": 0.1, "value_temperature": 2.0})):
            rows.append({"label": label, "seed": seed, "oracle_score": 0.5 + 0.01 * seed, "margin_accuracy": 0.6,
                         "win_rate_vs_adpa": 0.5, **{f"{CONFIG}loss.{k}": v for k, v in loss.items()},
                         LEARNING_RATE: 3e-5, EPOCHS: 2.0})
    return pd.DataFrame(rows)


def _dial_frame() -> pd.DataFrame:
    rows = []
    for seed in range(3):
        for label in ("dpo", "rho=1.00", "rho=0.00", "soft_value"):
            tvkd = label != "dpo"
            rows.append({"label": label, "seed": seed, "oracle_score": 0.5, "margin_accuracy": 0.6,
                         "teacher_signal/oracle_gap_correlation": 0.5 if tvkd else np.nan,
                         BETA_COL: 0.1, ALPHA_COL: 0.7 if tvkd else None,
                         CONFIG + "loss.offset_norm": "std" if tvkd else None})
    return pd.DataFrame(rows)


GRID = {"name": "my-grid", "seeds": [0, 1], "base": {"models": {"student": "s"}, "data": {"source": "d.jsonl"}},
        "variants": [{"label": "dpo", "loss": {"name": "dpo"}}, {"label": "tvkd", "loss": {"name": "tvkd"}}],
        "axes": {"loss.beta": [0.1, 0.3]}}


def _grid_frame() -> pd.DataFrame:
    rows = [{"label": f"{v},loss.beta={b}", "variant": v, "loss.beta": b, "seed": s, "oracle_score": 0.5,
             BETA_COL: b, ALPHA_COL: 0.7 if v == "tvkd" else None}
            for s in (0, 1) for v in ("dpo", "tvkd") for b in (0.1, 0.3)]
    return pd.DataFrame(rows)


def _grid(df: pd.DataFrame, tmp: Path) -> str:
    return write_grid_tables(parse_spec(GRID), df, tmp)["md"].read_text()


def _tvkd_rows(df: pd.DataFrame) -> pd.Series:
    method = df["method"] if "method" in df.columns else df.get("variant", df["label"])
    return method.astype(str).str.startswith("tvkd")


#: (name, frame, render, the column changed, the runs it is changed on, the new value, the caption's words before
#: and after the change)
CASES = [
    ("main_table", _main_table_frame, format_main_table, ALPHA_COL, lambda df: df["label"] == "tvkd", 0.5,
     "α 0.7 (TVKD (ours))", "α 0.5 (TVKD (ours))"),
    ("main_table β", _main_table_frame, format_main_table, BETA_COL, lambda df: df["label"] == "dpo", 0.05,
     "β 2 (SimPO), 0.1 (the other rows)", "β 0.05 (DPO), 2 (SimPO), 0.1 (TVKD (ours))"),
    ("reward_conflict", lambda: store_frame("reward-conflict", STORE).frame, format_reward_conflict, ALPHA_COL, None,
     0.3, "α 0.7, none for DPO and DPO on oracle labels (ceiling)",
     "α 0.3, none for DPO and DPO on oracle labels (ceiling)"),
    ("model_ablation", lambda: fixture_frame("model_ablation"), format_model_ablation, ALPHA_COL, _tvkd_rows, 0.5,
     "α 0.7 (TVKD (ours))", "α 0.5 (TVKD (ours))"),
    ("teacher_type", lambda: fixture_frame("teacher_type"), format_teacher_type, BETA_COL,
     lambda df: df["variant"] == "dpo", 0.05, "β 0.01 (DCKD), 0.1 (the other rows)",
     "β 0.05 (DPO (no teacher)), 0.01 (DCKD), 0.1 (TVKD (ours))"),
    ("teacher_type recipe", lambda: fixture_frame("teacher_type"), format_teacher_type, CONFIG + "testbed.dpo_lr", None,
     3e-4, "DPO epochs 3, learning rate 0.0001, β 0.1", "DPO epochs 3, learning rate 0.0003, β 0.1"),
    ("value_alignment", lambda: fixture_frame("value_alignment"), format_value_alignment, VALUE_TEMPERATURE,
     lambda df: df["label"] != "dpo", 1.0, "soft values (β_V 2, none for DPO Student",
     "soft values (β_V 1, none for DPO Student"),
    ("value_alignment α", lambda: fixture_frame("value_alignment"), format_value_alignment, ALPHA_COL,
     lambda df: (df["label"] == "tvkd") & (df["seed"] == 0), 0.5, "α 0.7 (TVKD (ours), TVKD, shuffled Ψ (control))",
     "α 0.5 (TVKD (ours): 1 of 3 runs), 0.7 (TVKD (ours): 2 of 3 runs, TVKD, shuffled Ψ (control))"),
    ("value_analysis", lambda: fixture_frame("value_analysis"), format_value_analysis, VALUE_TEMPERATURE, None, 1.0,
     "(ours: soft_value, β_V 2, shaping pbrs, γ 1;", "(ours: soft_value, β_V 1, shaping pbrs, γ 1;"),
    ("alpha_sensitivity", lambda: fixture_frame("alpha_sensitivity"), lambda df: format_sensitivity(df, sweep=ALPHA),
     BETA_COL, None, 0.2, "β 0.1; β_V 2, none for DPO", "β 0.2; β_V 2, none for DPO"),
    ("beta_sensitivity", lambda: fixture_frame("beta_sensitivity"), lambda df: format_sensitivity(df, sweep=BETA),
     ALPHA_COL, None, 0.9, "α 0.7, none for DPO; β 0.1;", "α 0.9, none for DPO; β 0.1;"),
    ("mt_bench_categories", lambda: fixture_frame("mt_bench_categories"), format_mt_bench_categories, ALPHA_COL, None,
     0.5, "α 0.7 (TVKD (ours), TVKD, shuffled Ψ (control))", "α 0.5 (TVKD (ours), TVKD, shuffled Ψ (control))"),
    ("teacher_signal_dial", _dial_frame, format_dial, ALPHA_COL, None, 0.4, "α 0.7, none for DPO",
     "α 0.4, none for DPO"),
    ("teacher_signal_dial norm", _dial_frame, format_dial, CONFIG + "loss.offset_norm", None, "none",
     "; offset_norm std (std: the offsets scaled to unit spread; none: as they are)",
     "; offset_norm none (std:"),
]


@pytest.mark.parametrize("name, make, render, column, where, value, before, after", CASES, ids=[c[0] for c in CASES])
def test_a_caption_follows_the_runs_settings(name, make, render, column, where, value, before, after):
    df = make()
    text = _quiet(render, df)
    assert before in text, text.splitlines()[-1]
    changed = _quiet(render, _set(df, column, value, where(df) if where else None))
    assert after in changed and before not in changed, changed.splitlines()[-1]


@pytest.mark.parametrize("name, make, render", [(c[0], c[1], c[2]) for c in CASES if " " not in c[0]],
                         ids=[c[0] for c in CASES if " " not in c[0]])
def test_a_frame_without_the_settings_says_nothing_about_them(name, make, render):
    text = _quiet(render, _without_config(make()))
    assert "Settings from the runs' configs" not in text
    for words in ("α 0.7", "β 0.1", "β_V 2", "β_V = 2", "3e-05", "lr 1e-4", "γ 1", "offset_norm", "α 0.7, β 0.1"):
        assert words not in text, (words, text.splitlines()[-1])


def test_the_grid_caption_states_the_settings_its_axes_do_not_sweep(tmp_path):
    text = _grid(_grid_frame(), tmp_path)
    assert "α 0.7 (tvkd,loss.beta=0.1, tvkd,loss.beta=0.3)" in text and "β " not in text.splitlines()[-1]
    assert "α 0.2" in _grid(_set(_grid_frame(), ALPHA_COL, 0.2), tmp_path)
    assert "Settings from" not in _grid(_without_config(_grid_frame()), tmp_path)
