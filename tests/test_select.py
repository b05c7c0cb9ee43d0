"""Per-method selection on validation: the held-out validation split (``data.validation_fraction``), the
``select`` block of a study spec, and the picks (`reports.selection`) the tables are built from."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from studies.spec import StudySpecError, parse_spec
from tvkd.config import config_from_dict
from tvkd.data.examples import PreferenceExample
from tvkd.data.holdout import held_out, split_validation


def _pairs(n: int, repeats: int = 1) -> list[PreferenceExample]:
    return [PreferenceExample(id=f"p{i}-{k}", prompt=[{"role": "user", "content": f"sort : {i}"}],
                              chosen=[{"role": "assistant", "content": "a"}],
                              rejected=[{"role": "assistant", "content": f"b{k}"}])
            for i in range(n) for k in range(repeats)]


# -- the validation split ------------------------------------------------------------------------------------------


def test_the_holdout_depends_on_the_prompt_only_and_keeps_a_prompts_pairs_together():
    pairs = _pairs(2000, repeats=2)
    train, val = split_validation(pairs, 0.1)
    assert len(train) + len(val) == len(pairs)
    train_prompts = {json.dumps(p.prompt) for p in train}
    val_prompts = {json.dumps(p.prompt) for p in val}
    assert not train_prompts & val_prompts  # no prompt both trained on and validated on
    assert all(sum(json.dumps(p.prompt) == json.dumps(q.prompt) for q in val) == 2 for p in val[:5])
    assert 0.08 < len(val_prompts) / 2000 < 0.12  # about the fraction (a hash, not an exact count)
    # row order, a limit and another method or seed do not move it: the same prompts whatever comes with them
    shuffled = list(pairs)
    np.random.default_rng(3).shuffle(shuffled)
    assert {p.id for p in split_validation(shuffled, 0.1)[1]} == {p.id for p in val}
    assert {p.id for p in split_validation(pairs[:1000], 0.1)[1]} == {p.id for p in val if p in pairs[:1000]}
    # a larger fraction holds out a superset
    assert {p.id for p in val} < {p.id for p in split_validation(pairs, 0.2)[1]}
    assert held_out([{"role": "user", "content": "x"}], 0.5) == held_out([{"content": "x", "role": "user"}], 0.5)


def test_default_leaves_the_run_config_and_its_identity_as_they_were():
    plain = config_from_dict({}).to_dict()
    assert "validation_fraction" not in plain["data"] and "validation_reward_model" not in plain["eval"]
    on = config_from_dict({"data": {"validation_fraction": 0.1}, "eval": {"validation_reward_model": "oracle"}})
    assert on.to_dict()["data"]["validation_fraction"] == 0.1
    assert on.to_dict()["eval"]["validation_reward_model"] == "oracle"


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, True, "a tenth"])
def test_a_bad_validation_fraction_is_one_error_naming_the_key(value):
    from tvkd.api import ConfigError

    with pytest.raises(ConfigError, match=r"data.*validation_fraction") as e:
        config_from_dict({"data": {"validation_fraction": value}}, where="run.yaml")
    assert "\n" not in str(e.value)


def _cfg(world, **data):
    return config_from_dict({
        "name": "val", "models": {"student": world["student"]},
        "data": {"source": world["data"], "test_source": world["data"], "test_split": "train", "test_limit": 8, **data},
        "tokenize": {"max_length": 32, "max_prompt_length": 16}, "loss": {"name": "dpo"},
        "train": {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "warmup_steps": 0,
                  "extra": {"max_steps": 2}},
        "eval": {"max_new_tokens": 4, "teacher_scores": False, "margin_accuracy": False}})


@pytest.mark.parametrize(("fraction", "side"), [(1e-6, "no validation pair"), (0.999999, "no training pair")])
def test_a_fraction_that_leaves_a_side_empty_is_an_input_error_before_any_model_loads(tiny_world, fraction, side):
    from tvkd.pipeline import InputError, plan_run

    with pytest.raises(InputError, match=f"data.validation_fraction: .*leaves {side}"):
        plan_run(_cfg(tiny_world, validation_fraction=fraction), progress=False)


def test_validation_pairs_are_never_trained_on_and_scored_by_the_reward_model(tiny_world, tmp_path):
    from tests.test_bench_rm_score import _tiny_rm
    from tvkd.benchmarks.rm_score import HFRewardModel
    from tvkd.pipeline import execute, plan_run
    from tvkd.results import ResultsStore

    rm_dir = _tiny_rm(tmp_path / "rm", adds_bos=False)
    cfg = _cfg(tiny_world, validation_fraction=0.4)
    cfg.eval.validation_reward_model = rm_dir
    plan = plan_run(cfg, progress=False)
    val_prompts = {json.dumps(e.prompt) for e in plan.validation}
    train_prompts = {json.dumps(e.prompt) for e in plan.train_data.examples}
    assert val_prompts and train_prompts and not val_prompts & train_prompts
    assert len(plan.train_data.examples) == 24 - len(plan.validation)
    assert set(plan.tokenized_train.dataset["id"]) == {e.id for e in plan.train_data.examples}
    assert plan.key["data"]["validation_fraction"] == 0.4  # another run than the one without a split

    rec = execute(cfg, store=ResultsStore(tmp_path / "results"), progress=False)
    rows = rec.outputs("validation.jsonl")
    assert {r["prompt"] for r in rows} == {json.loads(p)[-1]["content"] for p in val_prompts}
    rm = HFRewardModel(rm_dir)
    direct = rm.score([[{"role": "user", "content": r["prompt"]}] for r in rows], [r["response"] for r in rows])
    assert [r["rm"] for r in rows] == pytest.approx(direct, abs=1e-5)
    assert rec.metrics["val/rm_score"] == pytest.approx(float(np.mean(direct)), abs=1e-5)
    assert rec.metrics["val/prompts"] == len(val_prompts)
    assert "val/oracle_score" not in rec.metrics  # no oracle off the testbed


# -- select in a study spec ----------------------------------------------------------------------------------------

BASE = {"models": {"student": "testbed:student_sft"},
        "data": {"source": "testbed:student_pref_train", "validation_fraction": 0.1}}
SPEC = {"name": "sel", "seeds": [0, 1], "base": BASE, "reference_variant": "dpo",
        "variants": [{"label": "dpo", "loss": {"name": "dpo"}}, {"label": "sv", "loss": {"name": "tvkd"}}],
        "select": {"metric": "oracle_score", "over": "learning_rate", "values": [1e-5, 1e-4]}}


def test_select_over_learning_rate_is_an_axis_of_every_variant():
    spec = parse_spec(SPEC)
    runs = spec.runs()
    assert [(r.label, r.seed, r.config.train.learning_rate) for r in runs[:4]] == [
        ("dpo,train.learning_rate=1e-05", 0, 1e-5), ("dpo,train.learning_rate=0.0001", 0, 1e-4),
        ("sv,train.learning_rate=1e-05", 0, 1e-5), ("sv,train.learning_rate=0.0001", 0, 1e-4)]
    assert len(runs) == 8 and spec.select.axis == "train.learning_rate" and spec.select.column == "val/oracle_score"
    assert all(r.config.data.validation_fraction == 0.1 for r in runs)


@pytest.mark.parametrize(("select", "message"), [
    ({"metric": "oracle", "over": "learning_rate", "values": [1e-5, 1e-4]},
     "select.metric: 'oracle' is not one of oracle_score, rm_score (did you mean 'oracle_score'?)"),
    ({"metrc": "oracle_score", "over": "learning_rate", "values": [1e-5, 1e-4]},
     "select.metrc: unknown key (did you mean 'metric'?)"),
    ({"metric": "oracle_score", "over": "learning_rates", "values": [1e-5, 1e-4]},
     "select.over: 'learning_rates' is not one of learning_rate, checkpoints (did you mean 'learning_rate'?)"),
    ({"metric": "oracle_score", "over": "checkpoints"}, "select.values: missing; the fractions of the training"),
    ({"metric": "oracle_score", "over": "checkpoints", "values": [0.5, 1.5]},
     "select.values[1]: 1.5 is not a fraction of the training steps in (0, 1]"),
    ({"metric": "oracle_score", "over": "checkpoints", "values": [0.5]}, "a list of at least two fractions"),
    ({"metric": "oracle_score", "over": "learning_rate"}, "select.values: missing"),
    ({"metric": "oracle_score", "over": "learning_rate", "values": [1e-5]}, "at least two values"),
    ({"metric": "oracle_score", "over": "learning_rate", "values": [1e-5, "x"]},
     "select.values[1]: expected a number, got 'x'"),
    ({"metric": "oracle_score", "over": "learning_rate", "values": [1e-5, 1e-5]}, "select.values[1]: 1e-05 repeats"),
    ({"metric": "oracle_score", "over": "learning_rate", "values": [1e-5, -1.0]}, "learning_rate must be > 0"),
    ("lr", "select: expected a mapping"),
])
def test_a_bad_select_block_names_its_field(select, message):
    with pytest.raises(StudySpecError) as e:
        parse_spec({**SPEC, "select": select})
    assert message in str(e.value)


def test_select_needs_the_validation_split_and_a_reward_model_off_the_testbed():
    with pytest.raises(StudySpecError, match=r"select: picks on a validation split.*base.data.validation_fraction"):
        parse_spec({**SPEC, "base": {**BASE, "data": {"source": "testbed:student_pref_train"}}})
    hub = {"models": {"student": "org/student"}, "data": {"source": "org/pairs", "test_source": None,
                                                         "validation_fraction": 0.1}}
    rm = {**SPEC["select"], "metric": "rm_score"}
    with pytest.raises(StudySpecError, match="rm_score needs a reward model.*validation_reward_model"):
        parse_spec({**SPEC, "base": hub, "select": rm})
    ok = parse_spec({**SPEC, "base": {**hub, "eval": {"validation_reward_model": "org/rm"}}, "select": rm})
    assert ok.select.column == "val/rm_score"
    with pytest.raises(StudySpecError, match=r"select: over learning_rate sweeps train.learning_rate itself"):
        parse_spec({**SPEC, "axes": {"train.learning_rate": [1e-3, 1e-2]}})


def test_the_select_learning_rate_study_and_its_paper_profile_load():
    from studies.spec import load_spec

    spec = load_spec("select-learning-rate")
    assert spec.select.metric == "oracle_score" and len(spec.select.values) >= 3
    assert {r.variant for r in spec.runs()} >= {"dpo", "soft_value"} and spec.seeds == [0, 1, 2]
    paper = load_spec("select-learning-rate", "paper")
    assert paper.select.metric == "rm_score" and paper.select.over == "learning_rate"
    assert all(r.config.eval.validation_reward_model for r in paper.runs())


# -- the picks -----------------------------------------------------------------------------------------------------


def _frame(spec) -> pd.DataFrame:
    """Synthetic runs: dpo is best on validation at 1e-4, sv at 1e-5; the test numbers say otherwise."""
    val = {("dpo", 1e-5): [0.50, 0.52], ("dpo", 1e-4): [0.60, 0.58], ("sv", 1e-5): [0.70, 0.66],
           ("sv", 1e-4): [0.65, 0.69]}  # sv: 0.68 vs 0.67
    test = {("dpo", 1e-5): [0.9, 0.9], ("dpo", 1e-4): [0.1, 0.2], ("sv", 1e-5): [0.3, 0.5], ("sv", 1e-4): [0.95, 0.9]}
    rows = []
    for r in spec.runs():
        lr = r.config.train.learning_rate
        items = {f"q{i}": (i % 3) / 2 + (0.25 if r.variant == "sv" and lr == 1e-5 else 0) for i in range(6)}
        rows.append({**r.info, "val/oracle_score": val[(r.variant, lr)][r.seed],
                     "oracle_score": test[(r.variant, lr)][r.seed], "items.oracle_score": items,
                     "win_rate_vs_dpo": -1.0})
    return pd.DataFrame(rows)


def test_each_variant_gets_the_rate_of_its_best_validation_mean_and_its_test_numbers():
    from reports.selection import select_runs

    spec = parse_spec(SPEC)
    result = select_runs(spec, _frame(spec))
    cands = result.candidates.set_index(["label", "train.learning_rate"])
    assert cands.loc[("dpo", 1e-4), "val/oracle_score.mean"] == pytest.approx(0.59)
    assert cands.loc[("sv", 1e-5), "val/oracle_score.mean"] == pytest.approx(0.68)
    assert cands.loc[("sv", 1e-4), "val/oracle_score.std"] == pytest.approx(np.std([0.65, 0.69], ddof=1))
    assert list(cands[cands["picked"]].index) == [("dpo", 1e-4), ("sv", 1e-5)]
    picked = result.picked
    assert list(zip(picked["label"], picked["seed"], picked["train.learning_rate"])) == [
        ("dpo", 0, 1e-4), ("sv", 0, 1e-5), ("dpo", 1, 1e-4), ("sv", 1, 1e-5)]
    assert list(picked["oracle_score"]) == [0.1, 0.3, 0.2, 0.5]  # the test numbers of the picks
    # win rates recomputed between the picks: sv's outputs score 0.25 more on every prompt than dpo's
    assert list(picked["win_rate_vs_dpo"]) == [0.5, 1.0, 0.5, 1.0]
    assert list(result.frame["picked"]).count(True) == 4


def test_a_tie_goes_to_the_first_value_and_a_value_without_runs_is_no_candidate():
    from reports.selection import select_runs

    spec = parse_spec(SPEC)
    frame = _frame(spec)
    frame.loc[frame["variant"] == "sv", "val/oracle_score"] = 0.5
    frame = frame[~((frame["variant"] == "dpo") & (frame["train.learning_rate"] == 1e-4))]
    cands = select_runs(spec, frame).candidates.set_index(["label", "train.learning_rate"])
    assert cands.loc[("sv", 1e-5), "picked"] and not cands.loc[("sv", 1e-4), "picked"]
    assert cands.loc[("dpo", 1e-4), "seeds"] == 0 and math.isnan(cands.loc[("dpo", 1e-4), "val/oracle_score.mean"])
    assert cands.loc[("dpo", 1e-5), "picked"]


def test_study_outputs_are_the_picks_table_and_the_selection(tmp_path):
    from reports.store import write_study_outputs

    spec = parse_spec(SPEC)
    written = write_study_outputs(spec, _frame(spec), tmp_path)
    assert list(written) == ["selection", "grid", "runs"]
    selection = pd.read_csv(tmp_path / "selection.csv")
    assert list(selection[selection["picked"]]["train.learning_rate"]) == [1e-4, 1e-5]
    md = (tmp_path / "selection.md").read_text()
    assert "Picks: dpo: 0.0001, sv: 1e-05." in md and md.count("**picked**") == 2
    grid = (tmp_path / "grid.md").read_text()
    rows = [line for line in grid.splitlines() if line.startswith("| dpo") or line.startswith("| sv")]
    assert len(rows) == 2 and "0.150 ± 0.071" in rows[0] and "0.400 ± 0.141" in rows[1]  # test oracle of the picks
    assert "+0.250 [+0.250, +0.250]" in rows[1]  # the paired Δ between the picks, not at one rate
    assert "picked on the validation split" in grid
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == 8 and runs["picked"].sum() == 4


@pytest.mark.slow
def test_the_quick_select_study_runs_end_to_end_through_the_engine(tmp_path):
    from studies.engine import run_study

    out = run_study("select-learning-rate", quick=True, results=tmp_path, progress=False)
    assert not out["failed"]
    frame = out["frame"]
    assert frame["val/oracle_score"].notna().all() and frame["oracle_score"].notna().all()
    selection = pd.read_csv(out["out_dir"] / "selection.csv")
    assert selection.groupby("label")["picked"].sum().to_dict() == {"dpo": 1, "simpo": 1, "ipo": 1, "soft_value": 1}
    for row in selection[selection["picked"]].to_dict("records"):
        same = selection[selection["label"] == row["label"]]
        assert row["val/oracle_score.mean"] == same["val/oracle_score.mean"].max()
    grid = (out["out_dir"] / "grid.md").read_text()
    assert sum(line.startswith(("| dpo ", "| simpo ", "| ipo ", "| soft_value ")) for line in grid.splitlines()) == 4


def test_the_compute_estimate_counts_the_held_out_pairs_as_validation_not_training():
    from reports.paper_compute import estimate_run
    from studies.spec import load_spec

    cfg = load_spec("select-learning-rate", "paper").runs()[0].config
    with_split = estimate_run(cfg, "a", 0, set())
    cfg.data.validation_fraction = None
    without = estimate_run(cfg, "a", 0, set())
    assert with_split.train_tokens == pytest.approx(without.train_tokens * 0.95, rel=1e-3)  # 5% held out
    n_s = with_split.student_params
    held = round(6750 * 0.05)
    assert with_split.flops["evaluation"] - without.flops["evaluation"] == pytest.approx(2.0 * n_s * held * 512)
    cfg.data.validation_fraction, cfg.eval.checkpoints = 0.05, [0.5, 1.0]
    checkpoints = estimate_run(cfg, "a", 0, set())
    assert checkpoints.flops["evaluation"] - with_split.flops["evaluation"] == pytest.approx(2 * 2.0 * n_s * held * 512)


# -- over checkpoints ----------------------------------------------------------------------------------------------


def test_select_over_checkpoints_sets_the_checkpoints_of_every_run():
    from tvkd.evaluation.validation import checkpoint_steps

    spec = parse_spec({**SPEC, "select": {"metric": "oracle_score", "over": "checkpoints", "values": [0.5, 1.0]}})
    runs = spec.runs()
    assert [r.label for r in runs[:2]] == ["dpo", "sv"] and spec.select.axis is None  # no axis: one run each
    assert all(r.config.eval.checkpoints == [0.5, 1.0] and r.config.eval.checkpoint_metric == "oracle_score"
               for r in runs)
    with pytest.raises(StudySpecError, match="select: over checkpoints sets eval.checkpoints"):
        parse_spec({**SPEC, "base": {**BASE, "eval": {"checkpoints": [1.0]}},
                    "select": {"metric": "oracle_score", "over": "checkpoints", "values": [0.5, 1.0]}})
    assert checkpoint_steps([0.25, 0.5, 0.75, 1.0], 182) == [46, 91, 136, 182]
    assert checkpoint_steps([0.01, 0.02, 1.0], 10) == [1, 10]
    assert "checkpoints" not in config_from_dict({}).to_dict()["eval"]


def test_a_run_keeps_and_is_tested_with_the_weights_of_its_best_validation_checkpoint(tiny_world, tmp_path,
                                                                                      monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    import tvkd.evaluation.validation as validation
    from tests.test_bench_rm_score import _tiny_rm
    from tvkd.pipeline import InputError, execute, plan_run
    from tvkd.results import ResultsStore

    rm_dir = _tiny_rm(tmp_path / "rm", adds_bos=False)
    store = ResultsStore(tmp_path / "results")
    cfg = _cfg(tiny_world, validation_fraction=0.4)
    cfg.eval.validation_reward_model = rm_dir
    cfg.train.extra = {"max_steps": 6}
    cfg.train.learning_rate = 0.01
    plain = execute(cfg, store=store, progress=False)

    # the reward model's score, then a score that tells the weights apart: minus their distance from the start,
    # so the earliest checkpoint is the best, and only its weights give its score again
    start = {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_world["student"])
             .state_dict().items()}
    real = validation.evaluate_validation

    def distance_scored(policy, *args, **kwargs):
        metrics, rows = real(policy, *args, **kwargs)
        with torch.no_grad():
            far = sum(float((v.float() - start[k]).abs().sum()) for k, v in policy.state_dict().items())
        return {**metrics, "val/distance": -far}, rows

    monkeypatch.setattr(validation, "evaluate_validation", distance_scored)
    cfg.eval.checkpoints = [0.3, 0.5, 1.0]
    cfg.eval.checkpoint_metric = "distance"  # picked by val/distance (set after the config's own check)
    picked = execute(cfg, store=store, progress=False)
    history = picked.metrics["val/checkpoints"]
    assert [h["step"] for h in history] == [2, 3, 6]
    distances = [h["val/distance"] for h in history]
    assert distances[0] > distances[1] > distances[2]  # training moves away from the start
    assert picked.metrics["val/checkpoint_step"] == 2
    # tested and validated with the picked weights: the final evaluation finds step 2's weights, not step 6's
    assert picked.metrics["val/distance"] == pytest.approx(distances[0], rel=1e-6)
    assert picked.metrics["val/rm_score"] == pytest.approx(history[0]["val/rm_score"], abs=1e-6)
    # evaluating along the way changes nothing of the training: the last step is the run without selection
    assert history[-1]["val/rm_score"] == pytest.approx(plain.metrics["val/rm_score"], abs=1e-6)
    assert picked.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], abs=1e-7)
    cfg.eval.checkpoint_metric = "oracle_score"
    with pytest.raises(InputError, match="eval.checkpoint_metric: oracle_score exists on testbed runs only"):
        plan_run(cfg, progress=False)


@pytest.mark.parametrize(("over", "message"), [
    ({"data": {"validation_fraction": None}}, "eval.checkpoints: checkpoints are picked on the validation split"),
    ({"eval_only": True}, "an eval_only run trains nothing"),
    ({"train": {"save_strategy": "steps"}}, "set train.save_strategy: no"),
])
def test_checkpoint_selection_needs_a_validation_split_and_one_uninterrupted_training(over, message):
    from studies.spec import deep_merge
    from tvkd.api import ConfigError

    ok = {"data": {"validation_fraction": 0.1}, "eval": {"checkpoints": [0.5, 1.0]}}
    assert config_from_dict(ok).eval.checkpoints == [0.5, 1.0]
    with pytest.raises(ConfigError, match=message):
        config_from_dict(deep_merge(ok, over))
    with pytest.raises(ConfigError, match=r"checkpoints\[1\] must be a fraction of the training steps"):
        config_from_dict({"data": {"validation_fraction": 0.1}, "eval": {"checkpoints": [0.5, 2]}})
    with pytest.raises(ConfigError, match="checkpoint_metric must be one of oracle_score, rm_score"):
        config_from_dict({"eval": {"checkpoint_metric": "oracle"}})


def test_the_checkpoint_selection_lists_each_steps_validation_mean_and_the_picks(tmp_path):
    from types import SimpleNamespace

    from reports.store import write_study_outputs

    spec = parse_spec({**SPEC, "select": {"metric": "oracle_score", "over": "checkpoints", "values": [0.5, 1.0]}})
    rows = []
    for r in spec.runs():
        shift = 0.1 if r.variant == "sv" else 0.0
        hist = [{"step": 5, "val/oracle_score": 0.5 + shift + r.seed / 100},
                {"step": 10, "val/oracle_score": 0.55 - 2 * shift}]
        best = max(hist, key=lambda h: h["val/oracle_score"])["step"]
        rows.append({**r.info, "label": r.label, "oracle_score": 0.6 + shift, "val/oracle_score": 0.5,
                     "record": SimpleNamespace(metrics={"val/checkpoints": hist, "val/checkpoint_step": best})})
    written = write_study_outputs(spec, pd.DataFrame(rows), tmp_path)
    assert list(written) == ["selection", "grid", "runs"]
    cands = pd.read_csv(tmp_path / "selection.csv")
    assert cands.to_dict("records") == [
        {"label": "dpo", "step": 5, "val/oracle_score.mean": pytest.approx(0.505), "val/oracle_score.std":
         pytest.approx(np.std([0.5, 0.51], ddof=1)), "seeds": 2, "picked_by_seeds": 0},
        {"label": "dpo", "step": 10, "val/oracle_score.mean": pytest.approx(0.55), "val/oracle_score.std": 0.0,
         "seeds": 2, "picked_by_seeds": 2},
        {"label": "sv", "step": 5, "val/oracle_score.mean": pytest.approx(0.605), "val/oracle_score.std":
         pytest.approx(np.std([0.6, 0.61], ddof=1)), "seeds": 2, "picked_by_seeds": 2},
        {"label": "sv", "step": 10, "val/oracle_score.mean": pytest.approx(0.35), "val/oracle_score.std": 0.0,
         "seeds": 2, "picked_by_seeds": 0}]
    assert "checkpoint picked on the validation split" in (tmp_path / "grid.md").read_text()
