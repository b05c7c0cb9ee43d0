"""`tvkd eval`: benchmarks on a finished run, metrics merged into its store without losing what was there."""

from __future__ import annotations

import json

import pytest

from tests.test_trust import cli, run_dirs, write_cfg


def test_eval_merges_analysis_metrics_into_a_run(tiny_world, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, loss={"name": "tvkd", "aux": "soft_value"},
                    **{"train.save_model": True})
    results = tmp_path / "results"
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    (run,) = run_dirs(results)
    before = json.loads((run / "metrics.json").read_text())
    code, out, err = cli(capsys, "eval", run, "--bench", "margin,value-kl", "--option", "n=6", "--results", results,
                         "--quiet")
    assert code == 0, err
    after = json.loads((run / "metrics.json").read_text())
    assert {k: after[k] for k in before if k != "margin_accuracy"} == {k: v for k, v in before.items()
                                                                       if k != "margin_accuracy"}
    assert after["margin_accuracy"] == before["margin_accuracy"]  # the same model, the same pairs
    assert "value_kl" in after and "policy_kl" in after and "metrics merged" in out


def test_eval_refuses_a_run_without_weights_and_unknown_benchmarks(tiny_world, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    results = tmp_path / "results"
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    (run,) = run_dirs(results)
    code, _, err = cli(capsys, "eval", run, "--bench", "mt-bnch", "--results", results)
    assert code == 2 and "unknown benchmark 'mt-bnch'" in err
    code, _, err = cli(capsys, "eval", run, "--bench", "margin", "--results", results)
    assert code == 2 and "kept no weights" in err and "save_model=true" in err


def _trained_run(tiny_world, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, loss={"name": "tvkd", "aux": "soft_value"},
                    **{"train.save_model": True})
    results = tmp_path / "results"
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    (run,) = run_dirs(results)
    return run, results


def test_a_failing_benchmark_is_recorded_and_the_others_run(tiny_world, tmp_path, capsys, monkeypatch):
    from tvkd.benchmarks import BENCHMARKS
    from tvkd.benchmarks import _run as runner
    from tvkd.benchmarks.rm_score import run_prompts

    run, results = _trained_run(tiny_world, tmp_path, capsys)

    def unreadable(run_dir, *args, **kwargs):
        raise OSError("outputs.jsonl: input/output error")

    # test prompts that cannot be read fail the benchmarks that need them, with the reason, and no other
    monkeypatch.setattr(runner, "_test_prompts", unreadable)
    BENCHMARKS.add("test-prompts", lambda ctx: {"test_prompts/n": len(run_prompts(ctx))}, description="",
                   options={})
    try:
        code, out, err = cli(capsys, "eval", run, "--bench", "test-prompts,margin", "--results", results, "--quiet")
    finally:
        BENCHMARKS.remove("test-prompts")
    assert code == 1 and "1 of 2 benchmarks failed: test-prompts (no test prompts" in err
    assert "reading them failed: OSError: outputs.jsonl: input/output error" in err and "  margin_accuracy: " in out
    monkeypatch.undo()

    def broken(ctx):
        raise AssertionError  # bare, as lm-eval's asserts are

    BENCHMARKS.add("test-broken", broken, description="fails", options={})
    try:
        code, out, err = cli(capsys, "eval", run, "--bench", "test-broken,margin,value-kl", "--option", "n=6",
                             "--results", results, "--quiet")
        from tvkd.benchmarks._run import BenchmarksFailed, evaluate

        with pytest.raises(BenchmarksFailed, match="1 of 1 benchmarks failed: test-broken"):  # callers in Python
            evaluate(run, ["test-broken"], {}, results=results, progress=False, say=lambda msg: None)
    finally:
        BENCHMARKS.remove("test-broken")
    assert code == 1
    assert "1 of 3 benchmarks failed: test-broken (AssertionError at test_eval_cli.py:" in err
    assert err.count("error:") == 1 and "Traceback" not in err + out
    metrics = json.loads((run / "metrics.json").read_text())
    failure = metrics["eval_failed/test-broken"]
    assert failure["error"].startswith("AssertionError at test_eval_cli.py:")
    assert "raise AssertionError" in (run / failure["traceback"]).read_text()
    # the benchmarks after it ran, and the console shows every number they computed
    assert metrics["eval/margin"]["n"] == metrics["margin_accuracy/n"] == 8
    assert metrics["value_kl/n"] == 6 and metrics["eval/value-kl"]["options"] == {"n": 6}
    for key in ("margin_accuracy", "implicit_reward_margin", "margin_accuracy/n", "value_kl", "policy_kl",
                "value_kl/n"):
        assert f"  {key}: " in out, key
    assert f"  value_kl: {metrics['value_kl']:.4f}" in out


def test_options_are_checked_per_benchmark(tiny_world, tmp_path, capsys):
    run, results = _trained_run(tiny_world, tmp_path, capsys)
    code, _, err = cli(capsys, "eval", run, "--bench", "rm", "--option", "rm_model=oracle", "--results", results)
    assert code == 2 and "--option rm_model: unknown option of rm; did you mean 'reward_model'?" in err
    code, _, err = cli(capsys, "eval", run, "--bench", "margin", "--option", "bogus=1", "--results", results)
    assert code == 2 and "--option bogus: unknown option of margin" in err
    code, _, err = cli(capsys, "eval", run, "--bench", "rm", "--option", "judge_model=x", "--results", results)
    assert code == 2 and "not an option of rm (it is one of alpaca-eval, mt-bench)" in err
    for secret in ("judge_api_key=abc", "api_key=abc", "judge_base_url=sk-abcdefghijkl0123"):
        code, _, err = cli(capsys, "eval", run, "--bench", "mt-bench", "--option", secret, "--results", results)
        assert code == 2 and "a secret is never passed as an option" in err and "TVKD_JUDGE_API_KEY" in err, secret
        assert "abc" not in err
    from tvkd.benchmarks._run import check_options

    assert check_options(["rm", "mt-bench"], {"max_new_tokens": 8, "reward_model": "oracle"}) == {
        "rm": {"max_new_tokens": 8, "reward_model": "oracle"}, "mt-bench": {"max_new_tokens": 8}}
    for name in ("hf_token", "judge_api_key", "password", "auth"):
        with pytest.raises(ValueError, match="a secret is never passed"):
            check_options(["mt-bench"], {name: "x"})
    code, out, _ = cli(capsys, "eval", "--list")
    assert code == 0
    assert "--option judge_model=...:" in out and "[shared with alpaca-eval: one --option sets it for all]" in out
    assert "max_new_tokens=..." in out and "[shared with" in out.split("--option max_new_tokens")[1].split("\n")[0]


@pytest.mark.parametrize("bench, option, expects", [
    ("shaping", "n=abc", "shaping expects an integer >= 1"),
    ("value-kl", "n=0", "value-kl expects an integer >= 1"),
    ("shaping", "aux=nope", "shaping expects a registered aux reward: expectation"),
    ("shaping", "gamma=1.5", "shaping expects a number in (0, 1]"),
    ("mt-bench", "judge_base_url=notaurl", "mt-bench expects an http:// or https:// URL"),
    ("mt-bench", "judge_tries=0", "mt-bench expects an integer >= 1"),
    ("alpaca-eval", "reference_run=/nowhere", "alpaca-eval expects an existing run folder"),
    ("alpaca-eval", "retry_missing=maybe", "alpaca-eval expects true or false"),
    ("oll", "tasks=arc,nope", "oll expects task names (unknown task 'nope'; valid: arc"),
    ("oll", "limit=0", "oll expects an integer >= 1 (documents per task) or a fraction in (0, 1)"),
    ("oll", "batch_size=big", "oll expects an integer >= 1 or one of auto"),
    ("rm", "rm_dtype=f64", "rm expects one of auto, float32, fp32, bfloat16, bf16"),
])
def test_an_option_value_is_checked_before_any_work(tmp_path, capsys, bench, option, expects):
    """A wrong value is one error line before a model loads or a judge is asked (not a failure recorded in the
    run's metrics after minutes of judging); the target is not even read."""
    code, _, err = cli(capsys, "eval", tmp_path / "no-run-here", "--bench", bench, "--option", option)
    assert code == 2 and err.startswith(f"error: --option {option.split('=')[0]}=") and expects in err, err
    assert not list(tmp_path.iterdir())


def test_good_option_values_pass_their_rules():
    from tvkd.benchmarks import BENCHMARKS, check_values

    good = {"shaping": {"n": 3, "aux": "max", "gamma": 1, "value_temperature": 0.5, "dtype": "bf16"},
            "mt-bench": {"judge_base_url": "http://127.0.0.1:8765/v1", "judge_timeout": 2.5},
            "oll": {"tasks": "arc,gsm8k", "limit": 0.25, "batch_size": "auto", "task_map": {"arc": "x"}},
            "oll ": {"limit": 10, "batch_size": 4}, "rm": {"rm_dtype": "fp32", "rm_trust_remote_code": False}}
    for bench, options in good.items():
        check_values(bench.strip(), options, BENCHMARKS.meta(bench.strip()).get("values") or {})
    from tvkd.benchmarks._run import parse_options  # read as run configs are: 1e-1 is a number

    parsed = parse_options(["judge_timeout=1e-1", "judge_base_url=http://127.0.0.1:1/v1"])
    assert parsed["judge_timeout"] == 0.1
    check_values("mt-bench", parsed, BENCHMARKS.meta("mt-bench")["values"])
    with pytest.raises(ValueError, match=r"--option 'n=\[1': the value is not valid YAML"):
        parse_options(["n=[1"])


def test_a_benchmarks_results_replace_its_earlier_ones_at_once(tiny_world, tmp_path, capsys):
    from tvkd.results import ResultsStore

    run, results = _trained_run(tiny_world, tmp_path, capsys)
    # an earlier evaluation left more keys than this one computes (six categories, a 16-question score)
    ResultsStore(results).merge_metrics(run, {"mt_bench/category/math": 7.0, "mt_bench/score": 6.5,
                                              "value_kl": 99.0, "value_kl/n": 200, "other/kept": 1.0})
    assert cli(capsys, "eval", run, "--bench", "value-kl", "--option", "n=3", "--results", results,
               "--quiet")[0] == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["value_kl/n"] == 3 and m["value_kl"] != 99.0 and m["eval/value-kl"]["options"] == {"n": 3}
    assert m["mt_bench/score"] == 6.5 and m["other/kept"] == 1.0  # another benchmark's keys are not touched
    assert set(m["eval/value-kl"]["keys"]) == {"value_kl", "policy_kl", "value_kl/n"}
    record = json.loads((run / "eval" / "value-kl.json").read_text())
    assert record["metrics"]["value_kl"] == m["value_kl"] and record["n"] == 3

    # a benchmark that returns fewer keys than last time leaves none of the old ones behind
    import torch

    from tvkd.benchmarks import BENCHMARKS

    answers = iter([{"test_x/a": 1.0, "test_x/b": 2.0, "test_x_extra": 5}, {"test_x/a": 3.0}])
    threads = []

    def bench(ctx):
        threads.append(torch.get_num_threads())
        return next(answers)

    BENCHMARKS.add("test-x", bench, description="", options={})
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            assert cli(capsys, "eval", run, "--bench", "test-x", "--threads", n, "--results", results,
                       "--quiet")[0] == 0
        code, _, err = cli(capsys, "eval", run, "--bench", "test-x", "--threads", 0, "--results", results)
        assert code == 2 and "--threads must be >= 1" in err
    finally:
        BENCHMARKS.remove("test-x")
        torch.set_num_threads(before)
    assert threads == [1, 2]  # `tvkd eval --threads N` sets torch's threads before any benchmark runs
    m = json.loads((run / "metrics.json").read_text())
    assert m["test_x/a"] == 3.0 and "test_x/b" not in m and "test_x_extra" not in m
