"""`alpaca-eval` end to end: the tiny student against another run's answers, judged through alpaca_eval.evaluate by
the loopback OpenAI-compatible judge (`judge_server.serve_judge`, scoring with the testbed oracle)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import make_tiny_llama, make_tiny_tokenizer
from tvkd.benchmarks import BENCHMARKS, BenchContext
from tvkd.benchmarks.alpaca_eval import alpaca_eval_bench
from tvkd.benchmarks.judge_server import serve_judge
from tvkd.testbed import tasks

PROMPTS = [[{"role": "user", "content": t}] for t in
           ("sort : c a b", "reverse : a b", "count : a b c d", "dedupe : a a b", "sort : e d", "reverse : b c a")]
OPTIONS = {"max_new_tokens": 6, "judge_model": "tvkd-oracle-judge", "max_concurrency": 2}


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch):
    for var in ("TVKD_JUDGE_API_KEY", "OPENAI_API_KEY", "TVKD_JUDGE_MODEL", "TVKD_JUDGE_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


def _ctx(tiny_world, run, **options):
    return BenchContext(run_dir=run, model_dir=tiny_world["student"], options={**OPTIONS, **options},
                        test_prompts=PROMPTS, progress=False, say=lambda m: None)


def _expected_win_rate(ours, theirs):
    """The judge's p = sigmoid(10 (r_ours - r_ref)) per pair (alpaca_eval undoes its order switch); 0.5 on a tie
    of identical outputs (never sent); in percent."""
    prefs = []
    for p, a, b in zip(PROMPTS, ours, theirs):
        if a == b:
            prefs.append(0.5)
        else:
            d = tasks.score(p[0]["content"], a) - tasks.score(p[0]["content"], b)
            prefs.append(1 / (1 + math.exp(-10 * d)))
    return 100 * sum(prefs) / len(prefs), sum(a != b for a, b in zip(ours, theirs))


def _numbers(metrics):
    """The metrics without the judge's request log of this call."""
    return {k: v for k, v in metrics.items() if k != "alpaca_eval/judge_faults"}


def _answers(run):
    (path,) = (run / "generations").glob("test-*.jsonl")
    by_key = {json.loads(line)["key"]: json.loads(line)["answer"] for line in path.read_text().splitlines()}
    return [by_key[json.dumps(p, sort_keys=True)] for p in PROMPTS]


def test_alpaca_eval_end_to_end_and_rerun_asks_nothing(tiny_world, tmp_path, monkeypatch):
    from tvkd.evaluation.generations import generations
    from tvkd.modeling import load_causal_lm

    # the reference run: another model's greedy answers to the same prompts, in its generations folder
    ref = tmp_path / "ref-run"
    teacher = load_causal_lm(tiny_world["teacher"], device="cpu")
    generations(teacher, make_tiny_tokenizer(), PROMPTS, {"do_sample": False, "max_new_tokens": 6}, ref, "test",
                progress=False)
    (path,) = (ref / "generations").glob("test-*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["answer"] = "b a"  # the ideal answer to one prompt, so the judge has something to prefer
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs = _answers(ref)

    run = tmp_path / "run"
    monkeypatch.setenv("TVKD_JUDGE_API_KEY", "sekrit-key")
    with serve_judge(require_key="sekrit-key") as (url, counters):
        metrics = alpaca_eval_bench(_ctx(tiny_world, run, reference_run=str(ref), judge_base_url=url))
        asked = counters.requests
        ours = _answers(run)
        expected, differing = _expected_win_rate(ours, theirs)
        assert asked == differing > 0 and counters.unauthorized == 0 and counters.unrecognised == 0
        assert counters.oracle == 2 * differing  # the judge saw the testbed prompts and both answers

        # a rerun (new process state: the annotator reloads alpaca_eval's cache from the run folder) asks nothing
        again = alpaca_eval_bench(_ctx(tiny_world, run, reference_run=str(ref), judge_base_url=url))
        assert counters.requests == asked

    assert metrics["alpaca_eval/win_rate"] == pytest.approx(expected, abs=1e-4)
    assert metrics["alpaca_eval/n"] == len(PROMPTS) and metrics["alpaca_eval/n_missing"] == 0
    assert 0 < metrics["alpaca_eval/standard_error"] < 100
    assert _numbers(again) == _numbers(metrics)  # the same numbers, to the last digit
    assert again["alpaca_eval/judge_faults"]["requests"] == 0
    import alpaca_eval

    assert metrics["alpaca_eval/judge_model"] == "tvkd-oracle-judge"
    assert metrics["alpaca_eval/judge_base_url"] == url
    assert metrics["alpaca_eval/annotator_config"] == "weighted_alpaca_eval_gpt4_turbo"
    assert metrics["alpaca_eval/version"] == alpaca_eval.__version__
    assert metrics["alpaca_eval/reference_source"].startswith("generations/test-")
    assert "length-controlled" in metrics["alpaca_eval/length_controlled_win_rate_absent"]
    assert not any(k.startswith("alpaca_eval/length_controlled_win") and not k.endswith("_absent") for k in metrics)

    # alpaca_eval's cache, annotations and our record live in the run folder; the key is in no file
    (folder,) = (run / "alpaca_eval").iterdir()
    assert (folder / "annotations_cache.json").is_file() and (folder / "configs.yaml").is_file()
    cached = json.loads((folder / "annotations_cache.json").read_text())
    assert len(cached) == differing and {r["annotator"] for r in cached} == {"weighted_alpaca_eval_gpt4_turbo"}
    (vs,) = [p for p in folder.iterdir() if p.name.startswith("vs-ref-run-")]
    result = json.loads((vs / "result.json").read_text())
    assert result["annotator_config"]["weighted_alpaca_eval_gpt4_turbo"]["completions_kwargs"]["model_name"] == \
           "tvkd-oracle-judge"
    for path in run.rglob("*"):
        if path.is_file():
            assert b"sekrit-key" not in path.read_bytes(), path


def test_alpaca_eval_reference_from_outputs_or_model(tiny_world, tmp_path):
    """A pipeline run's outputs.jsonl serves as the reference; one that keeps its model/ generates the answers."""
    ref = tmp_path / "adpa"
    ref.mkdir()
    ideal = [" ".join(tasks.parse_prompt(p[0]["content"]).ideal()) for p in PROMPTS]
    (ref / "outputs.jsonl").write_text("".join(json.dumps({"prompt": p[0]["content"], "response": a}) + "\n"
                                               for p, a in zip(PROMPTS, ideal)))
    run = tmp_path / "run"
    with serve_judge(garbage_first=2) as (url, counters):  # two unparseable judgements: missing, and cached so
        m = alpaca_eval_bench(_ctx(tiny_world, run, reference_run=str(ref), judge_base_url=url))
        expected, differing = _expected_win_rate(_answers(run), ideal)
        assert counters.requests == differing and m["alpaca_eval/n_missing"] == 2
        assert m["alpaca_eval/n"] == len(PROMPTS) - 2
        assert _numbers(alpaca_eval_bench(_ctx(tiny_world, run, reference_run=str(ref), judge_base_url=url))) == \
            _numbers(m)
        assert counters.requests == differing  # alpaca_eval does not ask for cached failures again...
        m = alpaca_eval_bench(_ctx(tiny_world, run, reference_run=str(ref), judge_base_url=url, retry_missing=True))
        assert counters.requests == differing + 2  # ...unless told to
    assert m["alpaca_eval/n_missing"] == 0 and m["alpaca_eval/n"] == len(PROMPTS)
    assert m["alpaca_eval/reference_source"] == "outputs.jsonl"
    assert m["alpaca_eval/win_rate"] == pytest.approx(expected, abs=1e-4)
    assert m["alpaca_eval/win_rate"] < 50  # ideal answers beat a random tiny student

    ref2 = tmp_path / "with-model"
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok), seed=5).save_pretrained(ref2 / "model")
    tok.save_pretrained(ref2 / "model")
    with serve_judge() as (url, counters):
        m2 = alpaca_eval_bench(_ctx(tiny_world, tmp_path / "run", reference_run=str(ref2), judge_base_url=url))
    assert m2["alpaca_eval/reference_source"] == "generations (from model/)"
    assert len(list((ref2 / "generations").glob("test-*.jsonl"))) == 1  # saved with the reference, reused later
    assert m2["alpaca_eval/n"] == len(PROMPTS)


def test_alpaca_eval_clear_errors(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="reference_run"):
        alpaca_eval_bench(_ctx(tiny_world, tmp_path / "run"))
    empty = tmp_path / "empty-ref"
    empty.mkdir()
    with pytest.raises(ValueError, match="no answer to 6 of the 6 prompts"):
        alpaca_eval_bench(_ctx(tiny_world, tmp_path / "run", reference_run=str(empty), judge_base_url="http://x"))
    with pytest.raises(ValueError, match="unknown alpaca_eval annotators_config 'nope'"):
        alpaca_eval_bench(_ctx(tiny_world, tmp_path / "run", reference_run=str(empty), annotators_config="nope"))

    from tvkd.benchmarks.alpaca_eval import judge_client

    with pytest.raises(ValueError, match="TVKD_JUDGE_API_KEY"):
        judge_client()  # OpenAI itself, no key: say which variable to set
    assert judge_client(base_url="http://127.0.0.1:1/v1").api_key == "EMPTY"


def test_alpaca_eval_is_registered():
    assert BENCHMARKS.get("alpaca-eval") is alpaca_eval_bench
    assert "reference_run" in BENCHMARKS.meta("alpaca-eval")["options"]


@pytest.mark.parametrize("fault", ["fail_first", "drop_first", "slow_first"])
def test_alpaca_eval_judge_faults_are_retried_then_missing(tiny_world, tmp_path, fault):
    """A timeout, an HTTP 500 or a closed connection: retried; what still fails is missing (not cached as such, so
    the next run asks again), and the benchmark never raises an openai traceback."""
    ref = tmp_path / "adpa"
    ref.mkdir()
    ideal = [" ".join(tasks.parse_prompt(p[0]["content"]).ideal()) for p in PROMPTS]
    (ref / "outputs.jsonl").write_text("".join(json.dumps({"prompt": p[0]["content"], "response": a}) + "\n"
                                               for p, a in zip(PROMPTS, ideal)))
    run = tmp_path / "run"
    server = {"fail_first": {"fail_first": 3}, "drop_first": {"drop_first": 3},
              "slow_first": {"delay": 3.0, "slow_first": 3}}[fault]
    # max_concurrency 1: the first three requests are the first pair's tries; the first pair is then missing
    opts = {"reference_run": str(ref), "judge_tries": 3, "max_concurrency": 1, "judge_timeout": 1.0}
    with serve_judge(**server) as (url, counters):
        m = alpaca_eval_bench(_ctx(tiny_world, run, judge_base_url=url, **opts))
        differing = _expected_win_rate(_answers(run), ideal)[1]
        assert counters.requests == differing + 2  # 3 tries for the first pair, one for each other
        assert m["alpaca_eval/n_missing"] == 1 and m["alpaca_eval/n"] == len(PROMPTS) - 1
        faults = m["alpaca_eval/judge_faults"]
        assert faults["missing"] == 1 and faults["retries"] == 2 and faults["last_error"]
        # the next run asks for the failed pair again (the server now answers), and only for it
        again = alpaca_eval_bench(_ctx(tiny_world, run, judge_base_url=url, **opts))
        assert counters.requests == differing + 3
    assert again["alpaca_eval/n_missing"] == 0 and again["alpaca_eval/n"] == len(PROMPTS)


def test_alpaca_eval_no_judgement_or_a_refused_key_is_an_error(tiny_world, tmp_path, monkeypatch):
    from tvkd.benchmarks.judge import JudgeUnavailable

    ref = tmp_path / "adpa"
    ref.mkdir()
    (ref / "outputs.jsonl").write_text("".join(json.dumps({"prompt": p[0]["content"], "response": "a"}) + "\n"
                                               for p in PROMPTS))
    opts = {"reference_run": str(ref), "judge_tries": 2, "max_concurrency": 1}
    with serve_judge(fail_first=1000) as (url, counters):
        with pytest.raises(JudgeUnavailable, match="none of the 6 pairs was judged.*InternalServerError"):
            alpaca_eval_bench(_ctx(tiny_world, tmp_path / "run", judge_base_url=url, **opts))
    monkeypatch.setenv("TVKD_JUDGE_API_KEY", "wrong-key")
    with serve_judge(require_key="right-key") as (url, counters):
        with pytest.raises(JudgeUnavailable, match="refused the key.*TVKD_JUDGE_API_KEY"):
            alpaca_eval_bench(_ctx(tiny_world, tmp_path / "run2", judge_base_url=url, **opts))
        assert counters.requests == 1  # nothing is asked after a 401


def test_alpaca_eval_refuses_references_of_another_length_and_judges_an_instruction_file(tiny_world, tmp_path):
    ref = tmp_path / "adpa"
    ref.mkdir()
    (ref / "config.yaml").write_text("eval:\n  max_new_tokens: 32\n")
    (ref / "outputs.jsonl").write_text("".join(json.dumps({"prompt": p[0]["content"], "response": "a"}) + "\n"
                                               for p in PROMPTS))
    with pytest.raises(ValueError, match="max_new_tokens 32.*ours with 6.*--option max_new_tokens=32"):
        alpaca_eval_bench(_ctx(tiny_world, tmp_path / "run", reference_run=str(ref), judge_base_url="http://x"))

    # AlpacaEval's own format: {instruction, output} rows; the outputs are the reference
    rows = [{"instruction": p[0]["content"], "output": " ".join(tasks.parse_prompt(p[0]["content"]).ideal()),
             "generator": "ideal"} for p in PROMPTS[:4]]
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(rows))
    with serve_judge() as (url, counters):
        m = alpaca_eval_bench(_ctx(tiny_world, tmp_path / "run", judge_base_url=url,
                                   instructions=str(tmp_path / "alpaca_eval.json")))
    assert m["alpaca_eval/n"] == 4 and m["alpaca_eval/instructions"] == str(tmp_path / "alpaca_eval.json")
    assert m["alpaca_eval/reference_source"].startswith("outputs of ")
    assert "stand_in_judge" in " ".join(m)


def test_alpaca_eval_instructions_offline_say_how_to_get_them(tiny_world, tmp_path):
    from tvkd.benchmarks.alpaca_eval import load_instructions

    with pytest.raises(ValueError, match="--option instructions=<alpaca_eval.json>"):
        load_instructions("alpaca_eval")  # offline: not in the local cache
    with pytest.raises(ValueError, match="neither 'run', 'alpaca_eval' nor a JSON"):
        load_instructions(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="row 0 has no 'instruction'"):
        load_instructions(str(tmp_path / "bad.json"))
