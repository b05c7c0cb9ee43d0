"""The LLM-as-judge client against the loopback oracle judge: caching, retries, missing answers, the
concurrency limit, no credential on disk, and the server's answers in each benchmark's own format."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from tvkd.benchmarks.judge import JudgeClient, JudgementCache, sanitize_url
from tvkd.benchmarks.judge_server import MODEL_NAME, oracle_or_stub, rating, read_task, serve_judge

SECRET = "sk-tvkd-test-0123456789abcdefSECRET"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVKD_CACHE", str(tmp_path / "cache"))
    for var in ("TVKD_JUDGE_MODEL", "TVKD_JUDGE_BASE_URL", "TVKD_JUDGE_API_KEY", "OPENAI_API_KEY",
                "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


def single(question: str, answer: str) -> list[dict[str, str]]:
    """FastChat's single-v1 layout (system + filled template)."""
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "[Instruction]\nRate it by \"[[rating]]\".\n\n"
                                        f"[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
                                        "[The End of Assistant's Answer]"}]


def parse(text: str) -> float:
    m = re.search(r"\[\[(\d+\.?\d*)\]\]", text)
    if not m:
        raise ValueError("no rating")
    return float(m.group(1))


PROMPTS = [single("sort : c a b", "a b c"), single("sort : c a b", ""), single("sort : c a b", "a c b")]
EXPECTED = [10.0, 1.0, 4.0]  # r* = 1, 0, 1/3


def client(url: str, **kw) -> JudgeClient:
    kw.setdefault("backoff", 0.01)
    return JudgeClient(MODEL_NAME, url, api_key=SECRET, **kw)


def test_rating_and_oracle():
    assert [rating(r) for r in (0.0, 1 / 3, 0.5, 1.0)] == [1, 4, 6, 10]
    assert oracle_or_stub("sort : c a b", "a b c") == (1.0, "oracle")
    r, source = oracle_or_stub("Compose a travel blog post.", "the cat")
    assert source == "stub" and 0 <= r < 1 and oracle_or_stub("Compose a travel blog post.", "the cat")[0] == r
    assert oracle_or_stub("Compose a travel blog post.", "  ") == (0.0, "stub")


def test_cache_makes_a_rerun_request_nothing():
    with serve_judge() as (url, counters):
        first = client(url)
        out = first.judge_many(PROMPTS, parse)
        assert [j.value for j in out] == EXPECTED and not any(j.cached for j in out)
        assert counters.requests == 3 and counters.oracle == 3
        assert first.report.requests == 3 and first.report.judged == 3 and first.report.cache_hits == 0
        again = client(url)  # a new process would see the same sqlite file
        out = again.judge_many(PROMPTS, parse)
        assert [j.value for j in out] == EXPECTED and all(j.cached for j in out)
        assert counters.requests == 3
        assert again.report.requests == 0 and again.report.cache_hits == 3
        # another temperature or judge model is another judgement
        assert client(url, temperature=0.5).judge(PROMPTS[0], parse).cached is False
        assert counters.requests == 4


def test_duplicates_in_one_call_are_asked_once():
    with serve_judge() as (url, counters):
        out = client(url).judge_many([PROMPTS[0]] * 4, parse)
        assert [j.value for j in out] == [10.0] * 4 and counters.requests == 1


def test_server_error_is_retried():
    with serve_judge(fail_first=1) as (url, counters):
        j = client(url)
        res = j.judge(PROMPTS[0], parse)
        assert res.value == 10.0 and res.attempts == 2
        assert j.report.requests == 2 and j.report.retries == 1 and j.report.missing == 0
        assert counters.failed == 1 and counters.answered == 1


def test_persistent_server_errors_are_missing_not_raised():
    with serve_judge(fail_first=1000) as (url, counters):
        j = client(url, tries=3)
        assert j.judge_many(PROMPTS[:2], parse, progress=False) == [None, None]
        assert j.report.missing == 2 and j.report.requests == 6 and j.report.retries == 4
        assert j.report.errors == {"InternalServerError": 6} and counters.requests == 6
        assert len(JudgementCache()) == 0  # nothing cached for a missing judgement


def test_backoff_is_exponential():
    with serve_judge(fail_first=1000) as (url, _):
        j = client(url, tries=3, backoff=0.1)
        t0 = time.perf_counter()
        assert j.judge(PROMPTS[0], parse) is None
        assert time.perf_counter() - t0 >= 0.3 - 0.02  # 0.1 + 0.2


def test_timeout_is_retried_then_missing():
    with serve_judge(delay=5.0) as (url, counters):
        j = client(url, timeout=0.2, tries=2)
        t0 = time.perf_counter()
        assert j.judge(PROMPTS[0], parse) is None
        assert time.perf_counter() - t0 < 3.0
        assert j.report.missing == 1 and j.report.requests == 2 and j.report.errors == {"APITimeoutError": 2}
        assert counters.slow == 2


def test_slow_first_answer_then_a_good_one():
    with serve_judge(delay=5.0, slow_first=1) as (url, _):
        j = client(url, timeout=0.3, tries=3)
        assert j.judge(PROMPTS[0], parse).value == 10.0
        assert j.report.retries == 1 and j.report.errors == {"APITimeoutError": 1}


def test_garbage_is_retried_then_missing():
    with serve_judge(garbage_first=1) as (url, counters):
        j = client(url)
        assert j.judge(PROMPTS[2], parse).value == 4.0
        assert j.report.rejected == 1 and j.report.retries == 1 and counters.garbage == 1
    with serve_judge(garbage_first=1000) as (url, counters):
        j = client(url, tries=3)
        assert j.judge(PROMPTS[1], parse) is None
        assert j.report.rejected == 3 and j.report.missing == 1 and counters.garbage == 3


def test_connection_refused_is_missing():
    with serve_judge() as (url, _):
        pass  # closed: nothing listens there any more
    j = client(url, tries=2, timeout=2)
    assert j.judge(PROMPTS[0], parse) is None
    assert j.report.missing == 1 and j.report.errors == {"APIConnectionError": 2}


def test_bad_request_is_not_retried():
    with serve_judge() as (url, counters):
        j = client(url)
        assert j.judge([{"role": "user", "content": "hello"}], parse) is None  # no judge prompt: HTTP 400
        assert j.report.requests == 1 and j.report.missing == 1 and counters.unrecognised == 1


def test_concurrency_limit_is_respected():
    prompts = [single(f"sort : {' '.join('abcde'[: 1 + i % 5])}", "a") for i in range(5)] + \
              [single(f"reverse : {' '.join('abcde'[: 1 + i % 5])}", "a") for i in range(5)]
    with serve_judge(delay=0.15) as (url, counters):
        j = client(url, max_concurrency=3)
        out = j.judge_many(prompts, parse)
        assert all(o is not None for o in out)
        assert counters.requests == 10 and 2 <= counters.max_in_flight <= 3

    lock, live, peak = threading.Lock(), [0], [0]

    def slow_judge(messages):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return "Rating: [[7]]"

    j = JudgeClient(complete=slow_judge, max_concurrency=2, cache=False)
    assert [o.value for o in j.judge_many(prompts, parse)] == [7.0] * 10
    assert peak[0] == 2 and j.report.requests == 10


def test_callable_backend_retries_and_caches():
    calls = []

    def flaky(messages):
        calls.append(messages)
        if len(calls) == 1:
            raise ConnectionError("down")
        if len(calls) == 2:
            return "no verdict"
        return "Rating: [[3]]"

    j = JudgeClient(complete=flaky, backoff=0.0)
    assert j.judge(PROMPTS[0], parse).value == 3.0
    assert j.report.requests == 3 and j.report.retries == 2 and j.report.rejected == 1
    assert j.record()["backend"] == "callable" and j.record()["base_url"] is None
    assert JudgeClient(complete=flaky).judge(PROMPTS[0], parse).cached and len(calls) == 3


def test_the_key_is_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("TVKD_JUDGE_API_KEY", SECRET)
    with serve_judge(require_key=SECRET, fail_first=1) as (url, counters):
        monkeypatch.setenv("TVKD_JUDGE_BASE_URL", url)
        j = JudgeClient(MODEL_NAME, backoff=0.01, template_version="test-v1")
        assert [o.value for o in j.judge_many(PROMPTS, parse)] == EXPECTED
        assert counters.unauthorized == 0
        record = j.record()
        assert record["base_url"] == url and record["template_version"] == "test-v1"
        assert record["packages"]["openai"] and record["report"]["requests"] == 4
        (tmp_path / "record.json").write_text(json.dumps(record))
        j.close()
        wrong = JudgeClient(MODEL_NAME, url, api_key="sk-wrong-key-for-this-test-000000", backoff=0.01)
        assert wrong.judge(single("sort : b a", "a b"), parse) is None  # 401: not retried
        assert wrong.report.requests == 1 and counters.unauthorized == 1
    assert SECRET not in repr(j) and SECRET not in json.dumps(record)
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert any(p.suffix == ".sqlite" for p in files)
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p


def test_client_needs_a_model_and_a_key():
    with pytest.raises(ValueError, match="TVKD_JUDGE_MODEL"):
        JudgeClient()
    with pytest.raises(ValueError, match="TVKD_JUDGE_API_KEY"):
        JudgeClient("gpt-4o-mini")
    assert JudgeClient("gpt-4o-mini", "http://127.0.0.1:9/v1").record()["base_url"] == "http://127.0.0.1:9/v1"


def test_sanitize_url():
    assert sanitize_url("https://user:pw@example.com:8443/v1?api-key=abc#x") == "https://example.com:8443/v1"
    assert sanitize_url(None) is None


# ------------------------------------------------------------------------------------- the server's formats


def _fastchat_prompts():
    from tvkd.benchmarks.mt_bench import data_dir, load_judge_prompts

    return load_judge_prompts(data_dir())


def test_server_reads_fastchat_single_and_pairwise_prompts():
    from tvkd.benchmarks.mt_bench import judge_messages, parse_rating

    p = _fastchat_prompts()
    q, good, bad = "sort : c a b", "a b c", "c"
    cases = {
        "single-v1": (p["single-v1"]["prompt_template"].format(question=q, answer=good), "mt-bench-single"),
        "single-math-v1": (p["single-math-v1"]["prompt_template"].format(question=q, answer=good, ref_answer_1=good),
                           "mt-bench-single"),
        "single-v1-multi-turn": (p["single-v1-multi-turn"]["prompt_template"].format(
            question_1="reverse : a b", answer_1="b a", question_2=q, answer_2=good), "mt-bench-single-multi-turn"),
        "single-math-v1-multi-turn": (p["single-math-v1-multi-turn"]["prompt_template"].format(
            question_1="reverse : a b", answer_1="b a", question_2=q, answer_2=good, ref_answer_1="x",
            ref_answer_2="y"), "mt-bench-single-multi-turn"),
    }
    with serve_judge() as (url, counters):
        j = client(url)
        for name, (user, fmt) in cases.items():
            msgs = judge_messages(p[name]["system_prompt"], user)
            assert read_task(msgs).format == fmt
            assert read_task(msgs).question == q and read_task(msgs).answers == [good]
            assert j.judge(msgs, parse_rating).value == 10.0, name
        pair = p["pair-v2"]["prompt_template"].format(question=q, answer_a=bad, answer_b=good)
        verdict = j.judge(judge_messages(p["pair-v2"]["system_prompt"], pair))
        assert verdict.text.endswith("[[B]]")
        pair_mt = p["pair-v2-multi-turn"]["prompt_template"].format(
            question_1="reverse : a b", question_2=q, answer_a_1="b a", answer_a_2=good, answer_b_1="b a",
            answer_b_2=good)
        assert j.judge(judge_messages(p["pair-v2-multi-turn"]["system_prompt"], pair_mt)).text.endswith("[[C]]")
        assert counters.formats == {"mt-bench-single": 2, "mt-bench-single-multi-turn": 2, "mt-bench-pair": 1,
                                    "mt-bench-pair-multi-turn": 1}


def _alpaca_messages(config: str, instruction: str, out1: str, out2: str) -> list[dict[str, str]]:
    """An alpaca_eval prompt template filled and split into chat messages as alpaca_eval does (chatml)."""
    import alpaca_eval

    path = Path(alpaca_eval.__file__).parent / "evaluators_configs" / config
    text = path.read_text().replace("{instruction}", instruction).replace("{output_1}", out1) \
        .replace("{output_2}", out2)
    return [{"role": role, "content": body.strip()}
            for role, body in re.findall(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", text, re.DOTALL)]


@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")
def test_server_answers_alpaca_eval_prompts_in_their_parsers_formats():
    import openai
    from alpaca_eval import completion_parsers as cp

    q, good, bad = "reverse : a b c", "c b a", "a b"
    with serve_judge() as (url, counters):
        api = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0)

        msgs = _alpaca_messages("alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt", q, bad, good)
        resp = api.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=1, logprobs=True,
                                           top_logprobs=5).model_dump()
        assert resp["choices"][0]["message"]["content"] == "M"
        preference = cp.logprob_parser(resp["choices"][0], numerator_token="m", denominator_tokens=["m", "M"],
                                       is_binarize=False)[0]
        assert preference > 1.99  # 1 prefers output_1 ("m"), 2 output_2 ("M"): the better one

        msgs = _alpaca_messages("alpaca_eval_gpt4/alpaca_eval.txt", q, good, bad)
        text = api.chat.completions.create(model=MODEL_NAME, messages=msgs).choices[0].message.content
        assert cp.ranking_parser(text) == [1]

        msgs = _alpaca_messages("alpaca_eval_gpt4_turbo_fn/alpaca_eval_fn.txt", q, bad, good)
        tools = [{"type": "function", "function": {"name": "make_partial_leaderboard", "parameters": {}}}]
        call = api.chat.completions.create(model=MODEL_NAME, messages=msgs, tools=tools).choices[0].message
        ordered = json.loads(call.tool_calls[0].function.arguments)["ordered_models"]
        assert cp.ranking_parser(ordered, model_1_name="m") == [2]

        msgs = _alpaca_messages("chatgpt_fn/basic_function_prompt.txt", q, good, bad)
        tools = [{"type": "function", "function": {"name": "print_best_model", "parameters": {}}}]
        call = api.chat.completions.create(model=MODEL_NAME, messages=msgs, tools=tools).choices[0].message
        assert json.loads(call.tool_calls[0].function.arguments) == {"best_output": "Output (a)"}
        assert counters.formats == {"alpaca-eval-clf": 1, "alpaca-eval-ranking": 1, "alpaca-eval-fn": 2}
        assert counters.oracle == 8


def _raw_post(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send a hand-made HTTP request (headers as given) and return what came back (b"" when nothing did)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(head + b"\r\n" + body)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def test_server_refuses_bad_requests_with_a_status_and_logs_each(caplog):
    import logging

    path = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    good = json.dumps({"model": "m", "messages": [{"role": "user", "content": "[Question]\nsort : b a\n\n"
                       "[The Start of Assistant's Answer]\na b\n[The End of Assistant's Answer]"}]}).encode()
    caplog.set_level(logging.INFO, logger="tvkd.judge_server")
    with serve_judge(max_body=1000, max_n=2) as (url, counters):
        def post(body: bytes, length: str | None = None) -> bytes:
            head = path + (f"Content-Length: {len(body) if length is None else length}\r\n".encode()
                           if length != "absent" else b"")
            return _raw_post(url, head, body)

        assert post(b"{not json").startswith(b"HTTP/1.1 400") and b"not JSON" in post(b"{not json")
        assert post(b"[1, 2]").startswith(b"HTTP/1.1 400")
        assert post(b'{"messages": 5}').startswith(b"HTTP/1.1 400")
        assert b"'n' must be an integer in 1..2" in post(json.dumps({"messages": [], "n": 50}).encode())
        assert post(b"{}", length="abc").startswith(b"HTTP/1.1 400")
        assert post(b"{}", length="-5").startswith(b"HTTP/1.1 400")
        assert post(b"{}", length="absent").startswith(b"HTTP/1.1 411")
        assert post(b"x" * 2000).startswith(b"HTTP/1.1 413")  # over max_body: refused unread
        assert post(b"{}", length="500").startswith(b"HTTP/1.1 400")  # the body ends before its length
        ok = post(good)
        assert ok.startswith(b"HTTP/1.1 200") and b"[[10]]" in ok
        assert counters.answered == 1 and counters.bad_requests == 10
    lines = [r.getMessage() for r in caplog.records if r.name == "tvkd.judge_server"]
    assert len(lines) == counters.requests == 11
    assert [int(line.split()[0][1:]) for line in lines] == list(range(1, 12))  # numbered in order
    assert "-> 413" in lines[8] and "-> 200 mt-bench-single by the oracle" in lines[-1]


def test_server_drops_connections_on_request():
    with serve_judge(drop_first=2) as (url, counters):
        judge = JudgeClient(MODEL_NAME, url, tries=3, backoff=0.0, cache=False)
        res = judge.judge(PROMPTS[0], parse)
        assert res is not None and res.attempts == 3 and counters.dropped == 2
        assert set(judge.report.errors) == {"APIConnectionError"}
