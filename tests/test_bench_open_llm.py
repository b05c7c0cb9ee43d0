"""`oll`: lm-eval's Open LLM Leaderboard v1 tasks, run end to end on the fixture tasks with the tiny student.

The fixture tasks (tests/fixtures/lm_eval_tasks) must be lm-eval's own configs on other data, so a test
compares every config key that decides a score with the installed lm-eval's task YAMLs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tvkd.benchmarks import BenchContext
from tvkd.benchmarks.open_llm import (
    FIXTURE_PATH,
    FIXTURE_TASKS,
    PAPER_TASKS,
    OllTask,
    _names,
    open_llm,
    scores_from_results,
    task_table,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lm_eval_tasks"
# What names a task and where its data come from: the only keys a fixture task may change.
DATA_KEYS = {"task", "task_alias", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "description"}


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def test_paper_table_is_the_leaderboard_setting():
    """Shot counts of lm-eval's own `openllm` group (the leaderboard v1), and the leaderboard's metrics."""
    import yaml

    group = yaml.safe_load((_lm_eval_tasks_dir() / "benchmarks" / "openllm.yaml").read_text())
    shots = {t["task"]: t["num_fewshot"] for t in group["task"]}
    assert shots.pop("truthfulqa") == 0 == PAPER_TASKS["truthfulqa"].num_fewshot  # the group; MC2 is reported
    assert shots == {s.task: s.num_fewshot for k, s in PAPER_TASKS.items() if k != "truthfulqa"}
    assert {k: (s.task, s.metric) for k, s in PAPER_TASKS.items()} == {
        "arc": ("arc_challenge", "acc_norm,none"), "hellaswag": ("hellaswag", "acc_norm,none"),
        "mmlu": ("mmlu", "acc,none"), "truthfulqa": ("truthfulqa_mc2", "acc,none"),
        "winogrande": ("winogrande", "acc,none"), "gsm8k": ("gsm8k", "exact_match,strict-match"),
    }
    assert PAPER_TASKS["mmlu"].aggregation == "subtask_mean"


def test_task_selection_and_maps():
    assert _names(None) == list(PAPER_TASKS)
    assert _names("gsm8k, arc_challenge,arc") == ["gsm8k", "arc"]  # keys or lm-eval names, no repeats
    with pytest.raises(ValueError, match="unknown task 'mmlu_pro'"):
        _names(["mmlu_pro"])
    table = task_table(["mmlu", "arc"], "fixture")
    assert [s.task for s in table.values()] == [FIXTURE_TASKS["mmlu"], FIXTURE_TASKS["arc"]]
    assert table["arc"].num_fewshot == 25 and table["arc"].metric == "acc_norm,none"
    assert task_table(["arc"], {"arc": "my_arc"})["arc"].task == "my_arc"
    with pytest.raises(ValueError, match="unknown keys"):
        task_table(None, {"arcc": "x"})
    assert FIXTURE_PATH == FIXTURES


def test_mmlu_is_the_unweighted_mean_of_its_subjects():
    """The leaderboard v1 averaged the subjects' accuracies; lm-eval's group number weights them by size."""
    results = {
        "results": {"g": {"acc,none": 0.7}, "s1": {"acc,none": 1.0}, "s2": {"acc,none": 0.0},
                    "sub": {"acc,none": 0.2}, "s3": {"acc,none": 0.5}},
        "group_subtasks": {"g": ["s1", "sub"], "sub": ["s2", "s3"]},
        "versions": {"g": 2, "s1": 1.0, "s2": 1.0, "s3": 1.0, "sub": 2},
        "n-shot": {"s1": 5, "s2": 5, "s3": 5},
        "n-samples": {"s1": {"original": 7, "effective": 7}, "s2": {"original": 1, "effective": 1},
                      "s3": {"original": 2, "effective": 2}},
    }
    (score,) = scores_from_results(results, {"mmlu": OllTask("g", 5, "acc,none", "subtask_mean")}).values()
    assert score["value"] == pytest.approx(0.5) and score["lm_eval_group_value"] == 0.7
    assert score["subtasks"] == 3 and score["documents"] == 10 and score["num_fewshot"] == 5
    with pytest.raises(ValueError, match="no 'acc_norm,none' for 's1'"):
        scores_from_results(results, {"mmlu": OllTask("g", 5, "acc_norm,none", "subtask_mean")})


# lm-eval's YAML of each task a fixture task stands for (under lm_eval/tasks)
REAL_YAMLS = {
    "tvkd_fixture_arc_challenge": "arc/arc_challenge.yaml", "tvkd_fixture_hellaswag": "hellaswag/hellaswag.yaml",
    "tvkd_fixture_mmlu_sorting": "mmlu/default/mmlu_abstract_algebra.yaml",
    "tvkd_fixture_mmlu_reversing": "mmlu/default/mmlu_philosophy.yaml",
    "tvkd_fixture_mmlu_stem": "mmlu/default/_mmlu_stem.yaml",
    "tvkd_fixture_mmlu_humanities": "mmlu/default/_mmlu_humanities.yaml",
    "tvkd_fixture_mmlu": "mmlu/default/_mmlu.yaml",
    "tvkd_fixture_truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
    "tvkd_fixture_winogrande": "winogrande/default.yaml", "tvkd_fixture_gsm8k": "gsm8k/gsm8k.yaml",
}


def _fixture_configs() -> dict[str, tuple[dict, dict]]:
    """{fixture task: (its config, lm-eval's config of the task it stands for)}, includes resolved."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = TaskManager(include_path=str(FIXTURES), include_defaults=False).task_index

    def load(path):
        cfg = load_yaml(path, resolve_func=False, recursive=True)
        for key in ("process_docs", "process_results", "doc_to_text", "doc_to_target", "doc_to_choice"):
            if isinstance(cfg.get(key), str) and "/" in cfg[key]:  # a !function: compare the function's name
                cfg[key] = "!function " + Path(cfg[key]).name
        return cfg

    assert set(FIXTURE_TASKS.values()) <= set(REAL_YAMLS)
    return {name: (load(ours[name].yaml_path), load(_lm_eval_tasks_dir() / real))
            for name, real in REAL_YAMLS.items()}


def test_fixture_tasks_are_lm_evals_configs_on_local_data():
    configs = _fixture_configs()
    for name, (ours, theirs) in configs.items():
        if "group" in ours:  # the MMLU groups: same aggregation, members renamed
            assert ours["aggregate_metric_list"] == theirs["aggregate_metric_list"], name
            assert ours["metadata"] == theirs["metadata"] and len(ours["task"]) <= len(theirs["task"]), name
            continue
        assert ours["dataset_path"] == "json" and ours["task"] == name, name
        assert set(ours) - DATA_KEYS == set(theirs) - DATA_KEYS, name
        for key in set(ours) - DATA_KEYS:
            assert ours[key] == theirs[key], (name, key)
        files = ours["dataset_kwargs"]["data_files"]
        splits = {ours.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")}
        assert splits - {None} <= set(files), name
        for file in files.values():
            assert (FIXTURES / file).is_file(), (name, file)
    assert configs["tvkd_fixture_mmlu_stem"][0]["task"] == ["tvkd_fixture_mmlu_stem_tasks"]
    for key, spec in PAPER_TASKS.items():  # the YAMLs compared are those of the paper's lm-eval tasks
        theirs = configs[FIXTURE_TASKS[key]][1]
        assert theirs.get("task") == spec.task or theirs.get("group") == spec.task, key


def test_fixture_shot_pools_hold_the_leaderboard_shots():
    """lm-eval draws n+1 documents when the few-shot pool may hold the evaluated one."""
    def rows(path):
        return sum(1 for line in (FIXTURES / path).read_text().splitlines() if line.strip())

    assert rows("arc_challenge/train.jsonl") >= 26 and rows("hellaswag/train.jsonl") >= 11
    assert rows("winogrande/train.jsonl") >= 6 and rows("gsm8k/train.jsonl") >= 5
    assert rows("mmlu/sorting/dev.jsonl") == rows("mmlu/reversing/dev.jsonl") == 5  # MMLU's dev: 5 per subject


def test_oll_end_to_end_on_the_fixture_tasks(tiny_world, tmp_path):
    import lm_eval

    run = tmp_path / "run"
    ctx = BenchContext(run_dir=run, model_dir=Path(tiny_world["student"]), say=lambda msg: None, options={
        "task_map": "fixture", "tasks_path": str(FIXTURES), "batch_size": 8, "device": "cpu",
        "gen_kwargs": {"max_gen_toks": 16},  # the tiny model's 128 positions cannot hold GSM8K's 256
    })
    metrics = open_llm(ctx)
    keys = list(PAPER_TASKS)
    for key in [*keys, "average"]:
        value = metrics[f"oll/{key}"]
        assert isinstance(value, float) and 0.0 <= value <= 1.0 and math.isfinite(value), (key, value)
    assert metrics["oll/average"] == pytest.approx(sum(metrics[f"oll/{k}"] for k in keys) / 6)
    cfg = metrics["oll/config"]
    assert cfg["lm_eval"] == lm_eval.__version__ and cfg["batch_size"] == 8 and cfg["dtype"] == "float32"
    assert cfg["average_over"] == keys and cfg["task_map"] == "fixture" and cfg["paper_setting"] is False
    for key, spec in PAPER_TASKS.items():
        entry = cfg["tasks"][key]
        assert entry["task"] == FIXTURE_TASKS[key] and entry["metric"] == spec.metric, key
        assert entry["num_fewshot"] == spec.num_fewshot, key  # lm-eval ran each task with the leaderboard's shots
        assert entry["version"] is not None and entry["documents"] >= 2, key
    detail = json.loads((run / "oll" / "results.json").read_text())
    subjects = [detail["results"][t]["acc,none"] for t in ("tvkd_fixture_mmlu_sorting", "tvkd_fixture_mmlu_reversing")]
    assert metrics["oll/mmlu"] == pytest.approx(sum(subjects) / 2)  # the subjects' mean, not size-weighted
    assert detail["results"]["tvkd_fixture_gsm8k"]["exact_match,strict-match"] == metrics["oll/gsm8k"]
    json.dumps(metrics)  # plain values: metrics.json takes them


def test_oll_names_missing_tasks_before_loading_the_model(tiny_world, tmp_path):
    ctx = BenchContext(run_dir=tmp_path, model_dir=Path(tiny_world["student"]), say=lambda msg: None,
                       options={"task_map": {"arc": "no_such_task"}, "tasks": "arc", "device": "cpu"})
    with pytest.raises(ValueError, match="no_such_task"):
        open_llm(ctx)


def test_oll_is_registered_with_its_options():
    from tvkd.benchmarks import BENCHMARKS

    assert BENCHMARKS.get("oll") is open_llm
    assert {"tasks", "limit", "tasks_path", "task_map", "batch_size"} <= set(BENCHMARKS.meta("oll")["options"])


def test_oll_fits_generation_lengths_to_a_short_context(tiny_world, tmp_path):
    """GSM8K asks for lm-eval's 256 new tokens; the tiny model has 128 positions: fitted, with a line saying so,
    instead of lm-eval's AssertionError."""
    said = []
    ctx = BenchContext(run_dir=tmp_path / "run", model_dir=Path(tiny_world["student"]), say=said.append, options={
        "task_map": "fixture", "tasks_path": str(FIXTURES), "tasks": "gsm8k", "batch_size": 8, "device": "cpu",
        "limit": 2})
    metrics = open_llm(ctx)
    assert 0.0 <= metrics["oll/gsm8k"] <= 1.0 and metrics["oll/gsm8k/n"] == 2
    cfg = metrics["oll/config"]
    assert cfg["context_length"] == 128 and cfg["paper_setting"] is False
    assert cfg["fitted_generation_lengths"] == {"tvkd_fixture_gsm8k": {"asked": 256, "given": 64}}
    assert any("asks for 256 new tokens but the model's context is 128 tokens: generating at most 64" in m
               for m in said)
    detail = json.loads((tmp_path / "run" / "oll" / "results.json").read_text())
    assert detail["configs"]["tvkd_fixture_gsm8k"]["generation_kwargs"]["max_gen_toks"] == 64
