"""Every benchmark end to end on the real testbed student through `tvkd eval` (slow: builds the testbed)."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_trust import cli, run_dirs

pytestmark = pytest.mark.slow


def test_every_benchmark_on_the_testbed_student(tmp_path, capsys, monkeypatch):
    from tvkd.benchmarks.judge_server import serve_judge

    monkeypatch.setenv("TVKD_JUDGE_API_KEY", "test-key-not-secret")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "name: tvkd\nnum_threads: 1\n"
        "models: {student: 'testbed:student_sft', teacher: 'testbed:teacher_dpo'}\n"
        "data: {source: 'testbed:student_pref_train', test_source: 'testbed:student_pref_test', "
        "subsample: 0.1, test_limit: 40}\n"
        "tokenize: {max_length: 96, max_prompt_length: 48}\n"
        "loss: {name: tvkd, aux: soft_value}\n"
        "train: {learning_rate: 3.0e-5, num_train_epochs: 1, per_device_train_batch_size: 32, save_model: true}\n"
        "eval: {max_new_tokens: 32}\n")
    results = tmp_path / "results"
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    (run,) = run_dirs(results)
    times = {}
    with serve_judge() as (url, counters):
        judge = ["--option", f"judge_base_url={url}", "--option", "judge_model=tvkd-oracle-judge"]
        length = ["--option", "max_new_tokens=32"]  # each benchmark takes only the options it declares
        for bench, extra in [("rm", length), ("alpaca-eval", [*judge, *length, "--option", f"reference_run={run}"]),
                             ("mt-bench", [*judge, *length, "--option", "question_limit=8"]),
                             ("oll", ["--option", "tasks_path=tests/fixtures/lm_eval_tasks", "--option",
                                      "task_map=fixture", "--option", "gen_kwargs={max_gen_toks: 16}"]),
                             ("margin", []), ("value-kl", ["--option", "n=20"]), ("shaping", ["--option", "n=2"])]:
            t0 = time.perf_counter()
            code, out, err = cli(capsys, "eval", run, "--bench", bench, *extra, "--results", results, "--quiet")
            times[bench] = time.perf_counter() - t0
            assert code == 0, (bench, err[-2000:])
        requests = counters.requests
        code, _, err = cli(capsys, "eval", run, "--bench", "mt-bench,alpaca-eval", *judge, *length, "--option",
                           f"reference_run={run}", "--option", "question_limit=8", "--results", results, "--quiet")
        assert code == 0 and counters.requests == requests  # a finished eval asks the judge nothing
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("rm/score", "alpaca_eval/win_rate", "mt_bench/score", "oll/average", "margin_accuracy",
                "value_kl", "shaping/files", "train_loss"):
        assert key in metrics, key
    print("benchmark seconds on the testbed:", {k: round(v, 1) for k, v in times.items()})
