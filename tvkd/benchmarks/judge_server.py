"""A loopback OpenAI-compatible judge backed by the testbed oracle, for testing judge benchmarks offline.

    with serve_judge(fail_first=1) as (base_url, counters):
        judge = JudgeClient("tvkd-oracle-judge", base_url)
        ...
        assert counters.requests == 2

`JudgeServer` is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) in a daemon thread. It answers
``POST /v1/chat/completions`` with OpenAI's response JSON (``id``, ``object: "chat.completion"``, ``created``,
``model``, ``choices[0].message``, ``finish_reason``, ``usage``; ``logprobs`` and ``tool_calls`` where asked for)
and ``GET /v1/models``. It reads the question and the answer(s) out of the judge prompt (the last user
message, the system message included in the search), scores each answer with ``scorer(question, answer)``
and answers in the format the benchmark's own parser expects.

Scores. The default scorer is the testbed oracle r*(question, answer) of `tvkd.testbed.tasks.score` when the
question is a testbed task (``sort : c a b``); for any other question (MT-Bench's own questions, say) no oracle
exists and it falls back to a *stub*: 0 for an empty answer, else a fixed pseudo-random number in [0, 1) from
a hash of (question, answer). The stub only makes the plumbing deterministic; it measures nothing. The
counters say how many answers each scored (``oracle``, ``stub``).

Formats understood (anything else is answered HTTP 400, counted in ``unrecognised``):

- MT-Bench single-answer grading, FastChat ``single-v1`` / ``single-math-v1`` (``[Question]``,
  ``[The Start of Assistant's Answer]``, optional ``[The Start of Reference Answer]``) and the multi-turn
  variants (``<|The Start of Assistant A's Conversation with User|>`` holding ``### User:`` / ``### Assistant A:``
  turns; the last user turn and the last answer are judged). Answer: ``... Rating: [[x]]`` with
  x = round(1 + 9 r), halves rounded up; FastChat's ``[[rating]]`` parser reads it.
- MT-Bench pairwise, ``pair-v2`` / ``pair-math-v1`` and their multi-turn variants (Assistant A and B).
  Answer: ``[[A]]``, ``[[B]]``, or ``[[C]]`` when the scores tie.
- AlpacaEval 2 classifier prompt (``alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt``, used by
  ``weighted_alpaca_eval_gpt4_turbo`` and ``weighted_alpaca_eval_gpt-4o-mini-2024-07-18``: the instruction
  in triple quotes after ``"instruction":``, outputs under ``"model_identifier": "m"`` / ``"M"``). Answer: the identifier of the better output
  (the first on a tie); with ``logprobs: true`` also ``logprobs.content[0].top_logprobs`` giving the two
  identifiers log p and log(1 - p), p = sigmoid(10 (r_1 - r_2)), which ``logprob_parser`` reads.
- AlpacaEval 1 ranking prompt (``alpaca_eval_gpt4/alpaca_eval.txt``: ``"model": "model_1"`` and
  ``"answer":`` in triple quotes).
  Answer: ``[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]`` (``ranking_parser``).
- AlpacaEval function-calling prompts, when the request carries ``tools``: ``make_partial_leaderboard`` /
  ``make_leaderboard`` (``{"ordered_models": [{"model": ..., "rank": 1}, ...]}``) and ``print_best_model``
  with the ``## Output (a):`` / ``## Output (b):`` prompt (``{"best_output": "Output (a)"}``); the same prompt
  without tools is answered ``Output (a)`` / ``Output (b)`` as text.

Misbehaviour, to test a client's retry path: ``delay`` seconds before answering (the first ``slow_first``
requests, or all when None), the connection closed without an answer for the first ``drop_first`` requests, then
HTTP ``fail_status`` (500) for the next ``fail_first``, then an unparseable answer (``garbage_text``) for the next
``garbage_first``, and ``require_key`` (401 unless the ``Authorization: Bearer`` header matches; the key is
compared, never stored). ``counters`` counts requests (every POST), what was done with them, and the most requests
in flight at once.

Limits. A body over ``max_body`` bytes (default 4 MiB) is answered 413 without being read, a missing or malformed
``Content-Length`` 400 (411 when absent), a body that is not a JSON chat-completion request (not an object,
``messages`` not a list of objects, ``n`` not an integer in 1..``max_n``) 400; each closes the connection. Every
request is logged (logger ``tvkd.judge_server``, INFO) with its number, status, what was done and the time taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

MODEL_NAME = "tvkd-oracle-judge"
MAX_BODY = 4 * 1024 * 1024  # bytes: judge prompts are a few kB; MT-Bench's longest is ~20 kB
MAX_N = 8  # completions per request
log = logging.getLogger("tvkd.judge_server")
GARBAGE_TEXT = "I am not able to evaluate this response."
STUB_MARK = "No testbed oracle for this question"  # in every judgement the stub scored: a client can flag it
Scorer = Callable[[str, str], "tuple[float, str] | float"]


def oracle_or_stub(question: str, answer: str) -> tuple[float, str]:
    """r*(question, answer) by the testbed oracle, or the stub for a question that is no testbed task."""
    from tvkd.testbed.tasks import score

    try:
        return float(score(question, answer)), "oracle"
    except ValueError:
        pass
    if not answer.strip():
        return 0.0, "stub"
    digest = hashlib.sha256(f"{question}\x00{answer}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, "stub"


def rating(r: float) -> int:
    """MT-Bench rating of a score r in [0, 1]: round(1 + 9 r), halves up, clipped to 1..10."""
    return int(min(10, max(1, math.floor(1 + 9 * float(r) + 0.5))))


@dataclass
class JudgeCounters:
    """What the server saw. Read the fields directly, or `snapshot()` for a consistent copy."""

    requests: int = 0  # POSTs (each numbered in the log)
    answered: int = 0  # judgements returned (HTTP 200, well-formed)
    failed: int = 0  # answered with fail_status (fail_first)
    dropped: int = 0  # connection closed without an answer (drop_first)
    bad_requests: int = 0  # refused before judging: body too large, bad Content-Length, bad JSON, bad n
    garbage: int = 0  # answered with garbage_text (garbage_first)
    slow: int = 0  # delayed by `delay`
    unauthorized: int = 0  # wrong or absent key with require_key
    unrecognised: int = 0  # prompts in no known format (HTTP 400)
    oracle: int = 0  # answers scored by the testbed oracle
    stub: int = 0  # answers scored by the stub (not a testbed question)
    in_flight: int = 0
    max_in_flight: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> int:
        with self._lock:
            value = getattr(self, name) + n
            setattr(self, name, value)
            if name == "in_flight":
                self.max_in_flight = max(self.max_in_flight, value)
            return value

    def add_format(self, name: str) -> None:
        with self._lock:
            self.formats[name] = self.formats.get(name, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items() if k != "_lock"}


class Unrecognised(ValueError):
    pass


class BadRequest(ValueError):
    """A request this server refuses before judging it: (HTTP status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, max_n: int = MAX_N) -> dict[str, Any]:
    """The JSON chat-completion request in ``body``; `BadRequest` (400) when it is not one."""
    try:
        request = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"the body is not JSON: {e}") from None
    if not isinstance(request, dict):
        raise BadRequest(400, f"the body is a JSON {type(request).__name__}, not a chat completion request object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest(400, "'messages' must be a list of message objects")
    n = request.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise BadRequest(400, f"'n' must be an integer in 1..{max_n}, got {n!r}")
    for key in ("tools", "top_logprobs"):
        if request.get(key) is not None and not isinstance(request[key], list if key == "tools" else int):
            raise BadRequest(400, f"{key!r} has the wrong type")
    return request


@dataclass
class JudgeTask:
    """A judge prompt, read: its format, the question, the answers (one or two) and their identifiers."""

    format: str
    question: str
    answers: list[str]
    ids: list[str] = field(default_factory=list)
    reference: str | None = None


# -------------------------------------------------------------------------------------------- prompt reading

_SINGLE_ANSWER = ("[The Start of Assistant's Answer]\n", "\n[The End of Assistant's Answer]")
_CONV = "<|The Start of Assistant {x}'s Conversation with User|>\n\n", "\n\n<|The End of Assistant {x}'s Conversation with User|>"
_TURNS = re.compile(r"### User:\n(.*?)\n\n### Assistant (?:A|B):\n(.*?)(?=\n\n### User:\n|\Z)", re.DOTALL)
_INSTRUCTION = re.compile(r'"instruction": """(.*?)""",\s*\}', re.DOTALL)
_OUTPUTS = re.compile(r'"(model_identifier|model)": "([^"]*)",\s*"(output|answer)": """(.*?)"""\s*\}', re.DOTALL)
_AB = re.compile(r"## Instruction:\n(.*?)\n\n## Output \(a\):\n(.*?)\n\n## Output \(b\):\n(.*?)\n\n## Which is best",
                 re.DOTALL)


def _between(text: str, start: str, end: str, *, last_end: bool = True) -> str | None:
    i = text.find(start)
    if i < 0:
        return None
    j = text.rfind(end) if last_end else text.find(end, i + len(start))
    if j < i + len(start):
        return None
    return text[i + len(start): j]


def _question_before(text: str, head: str) -> str:
    q = _between(text, head, "\n\n[The Start of ", last_end=False)
    if q is None:
        raise Unrecognised(f"no question after {head!r}")
    return q


def _conversation(text: str, who: str) -> tuple[str, str]:
    start, end = (s.format(x=who) for s in _CONV)
    block = _between(text, start, end, last_end=False)
    if block is None:
        raise Unrecognised(f"no conversation of Assistant {who}")
    turns = _TURNS.findall(block)
    if not turns:
        raise Unrecognised(f"no turns in the conversation of Assistant {who}")
    return turns[-1][0], turns[-1][1]


def read_task(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> JudgeTask:
    """Find the format, question and answer(s) of a judge prompt (see the module doc); `Unrecognised` if none."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise Unrecognised("no user message")
    text = _content(users[-1])
    whole = "\n".join(_content(m) for m in messages)
    if '"instruction": """' in text:
        inst = _INSTRUCTION.search(text)
        outs = _OUTPUTS.findall(text)
        if inst is None or len(outs) != 2:
            raise Unrecognised("an AlpacaEval-like prompt without one instruction and two outputs")
        ids = [o[1] for o in outs]
        kind = "alpaca-eval-fn" if tools else ("alpaca-eval-clf" if outs[0][0] == "model_identifier"
                                               else "alpaca-eval-ranking")
        return JudgeTask(kind, inst.group(1), [o[3] for o in outs], ids)
    if "## Output (a):" in text:
        found = _AB.findall(text)
        if not found:
            raise Unrecognised("an Output (a)/(b) prompt that could not be read")
        inst, a, b = found[-1]  # the last: the prompt's example comes first
        return JudgeTask("alpaca-eval-fn" if tools else "alpaca-eval-ab", inst, [a, b], ["Output (a)", "Output (b)"])
    if "[The Start of Assistant B's Answer]" in text:
        q = _question_before(text, "[User Question]\n")
        a = _between(text, "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's Answer]")
        b = _between(text, "[The Start of Assistant B's Answer]\n", "\n[The End of Assistant B's Answer]")
        if a is None or b is None:
            raise Unrecognised("a pairwise prompt without both answers")
        return JudgeTask("mt-bench-pair", q, [a, b], ["A", "B"])
    if "<|The Start of Assistant B's Conversation with User|>" in text:
        qa, a = _conversation(text, "A")
        _, b = _conversation(text, "B")
        return JudgeTask("mt-bench-pair-multi-turn", qa, [a, b], ["A", "B"])
    if _SINGLE_ANSWER[0] in text:
        q = _question_before(text, "[Question]\n")
        a = _between(text, *_SINGLE_ANSWER)
        ref = _between(text, "[The Start of Reference Answer]\n", "\n[The End of Reference Answer]", last_end=False)
        if a is None:
            raise Unrecognised("a single-answer prompt without the answer's end")
        return JudgeTask("mt-bench-single", q, [a], reference=ref)
    if "<|The Start of Assistant A's Conversation with User|>" in text and "[[rating]]" in whole:
        q, a = _conversation(text, "A")
        return JudgeTask("mt-bench-single-multi-turn", q, [a])
    raise Unrecognised("the prompt is in none of the formats this server reads (MT-Bench single/pairwise, "
                       "AlpacaEval clf/ranking/function)")


def _content(message: dict[str, Any]) -> str:
    c = message.get("content")
    if isinstance(c, list):  # content parts
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c or ""


# -------------------------------------------------------------------------------------------- answering


def _tool_arguments(name: str, task: JudgeTask, best: int) -> dict[str, Any]:
    if name in ("make_partial_leaderboard", "make_leaderboard"):
        order = [best, 1 - best]
        return {"ordered_models": [{"model": task.ids[i], "rank": r + 1} for r, i in enumerate(order)]}
    if name == "print_best_model":
        return {"best_output": ["Output (a)", "Output (b)"][best]}
    raise Unrecognised(f"unknown tool {name!r}")


def answer_for(task: JudgeTask, scores: list[float], request: dict[str, Any],
               sources: list[str] | None = None) -> dict[str, Any]:
    """The assistant message (and logprobs) of a judgement: {"content", "tool_calls", "logprobs"}."""
    sources = sources or ["oracle"] * len(scores)
    if task.format.startswith("mt-bench-single"):
        r = scores[0]
        why = f"The testbed oracle gives this answer r* = {r:.3f}." if sources[0] == "oracle" else \
            f"{STUB_MARK}; the stub scores the answer {r:.3f}."
        return {"content": f"{why} Rating: [[{rating(r)}]]"}
    r1, r2 = scores
    best = 0 if r1 >= r2 else 1
    if task.format.startswith("mt-bench-pair"):
        verdict = "C" if abs(r1 - r2) < 1e-12 else "AB"[best]
        return {"content": f"Assistant A scores {r1:.3f} and assistant B {r2:.3f}. [[{verdict}]]"}
    if task.format == "alpaca-eval-fn":
        tools = request.get("tools") or []
        choice = request.get("tool_choice")
        name = (choice.get("function", {}).get("name") if isinstance(choice, dict) else None) or \
            (tools[0].get("function", {}).get("name") if tools else "")
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(_tool_arguments(name, task, best))}}
        return {"content": None, "tool_calls": [call]}
    if task.format == "alpaca-eval-ranking":
        ranks = [1, 2] if best == 0 else [2, 1]
        return {"content": repr([{"model": task.ids[i], "rank": ranks[i]} for i in range(2)])}
    if task.format == "alpaca-eval-ab":
        return {"content": task.ids[best]}
    # alpaca-eval-clf
    out: dict[str, Any] = {"content": task.ids[best]}
    if request.get("logprobs"):
        p = 1.0 / (1.0 + math.exp(-10.0 * (r1 - r2)))
        p = min(max(p, 1e-9), 1 - 1e-9)
        top = sorted(((task.ids[0], math.log(p)), (task.ids[1], math.log(1 - p))), key=lambda t: -t[1])
        entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
        k = int(request.get("top_logprobs") or len(entries))
        chosen = next(e for e in entries if e["token"] == task.ids[best])
        out["logprobs"] = {"content": [{**chosen, "top_logprobs": entries[:max(k, 1)]}], "refusal": None}
    return out


class JudgeServer:
    """The server; use `serve_judge` unless you need start/stop by hand."""

    def __init__(self, *, scorer: Scorer = oracle_or_stub, delay: float = 0.0, slow_first: int | None = None,
                 fail_first: int = 0, fail_status: int = 500, garbage_first: int = 0,
                 garbage_text: str = GARBAGE_TEXT, require_key: str | None = None, model: str = MODEL_NAME,
                 host: str = "127.0.0.1", port: int = 0, drop_first: int = 0, max_body: int = MAX_BODY,
                 max_n: int = MAX_N):
        self.scorer = scorer
        self.delay = float(delay)
        self.slow_first = slow_first
        self.fail_first = int(fail_first)
        self.fail_status = int(fail_status)
        self.garbage_first = int(garbage_first)
        self.drop_first = int(drop_first)
        self.max_body = int(max_body)
        self.max_n = int(max_n)
        self.garbage_text = garbage_text
        self._require_key = require_key
        self.model = model
        self.counters = JudgeCounters()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> JudgeServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="tvkd-judge-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes delayed handlers
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # the request path ------------------------------------------------------------------------------------

    def _respond(self, n: int, headers: Any, body: bytes) -> tuple[int, dict[str, Any] | None, str]:
        """(status, payload, what was done); payload None: close the connection without an answer."""
        if self._require_key is not None and headers.get("Authorization", "") != f"Bearer {self._require_key}":
            self.counters.add("unauthorized")
            return 401, _error("invalid api key", "invalid_request_error", "invalid_api_key"), "unauthorized"
        if self.delay > 0 and (self.slow_first is None or n <= self.slow_first):
            self.counters.add("slow")
            if self._stop.wait(self.delay):
                return 503, _error("server shutting down", "server_error"), "shutting down"
        if n <= self.drop_first:
            self.counters.add("dropped")
            return 0, None, f"dropped (injected {n}/{self.drop_first})"
        if n <= self.drop_first + self.fail_first:
            self.counters.add("failed")
            k = n - self.drop_first
            return self.fail_status, _error(f"injected failure {k}/{self.fail_first}", "server_error"), "failed"
        try:
            request = parse_request(body, self.max_n)
        except BadRequest as e:
            self.counters.add("bad_requests")
            return e.status, _error(str(e), "invalid_request_error"), f"bad request: {e}"
        messages = list(request["messages"])
        if request.get("stream"):
            return 400, _error("streaming is not supported", "invalid_request_error"), "streaming refused"
        model = str(request.get("model") or self.model)
        if n <= self.drop_first + self.fail_first + self.garbage_first:
            self.counters.add("garbage")
            return 200, _completion(model, [{"content": self.garbage_text}], messages), "garbage"
        try:
            task = read_task(messages, request.get("tools"))
            scores, sources = [], []
            for a in task.answers:
                out = self.scorer(task.question, a)
                r, source = out if isinstance(out, tuple) else (out, "oracle")
                source = "stub" if source == "stub" else "oracle"
                self.counters.add(source)
                scores.append(float(r))
                sources.append(source)
            message = answer_for(task, scores, request, sources)
        except Unrecognised as e:
            self.counters.add("unrecognised")
            return 400, _error(f"unrecognised judge prompt: {e}", "invalid_request_error"), "unrecognised"
        self.counters.add_format(task.format)
        self.counters.add("answered")
        return 200, _completion(model, [message] * int(request.get("n") or 1), messages), \
            f"{task.format} by the {'/'.join(sorted(set(sources)))}"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # our own log line per request instead
                pass

            def _send(self, status: int, payload: dict[str, Any], *, close: bool = False) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if close:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout): nothing to tell it
                    pass
                if close:
                    self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model",
                                                                 "created": 0, "owned_by": "tvkd"}]})
                else:
                    self._send(404, _error(f"no route {self.path}", "invalid_request_error"))

            def _refuse(self, n: int, t0: float, status: int, message: str) -> None:
                server.counters.add("bad_requests")
                self._send(status, _error(message, "invalid_request_error"), close=True)  # the body is unread
                log.info("#%d POST %s -> %d bad request: %s (%.0f ms)", n, self.path, status, message,
                         1000 * (time.perf_counter() - t0))

            def do_POST(self) -> None:  # noqa: N802
                t0 = time.perf_counter()
                n = server.counters.add("requests")
                raw = self.headers.get("Content-Length")
                if raw is None:
                    self._refuse(n, t0, 411, "a Content-Length header is required")
                    return
                try:
                    length = int(raw)
                    if length < 0:
                        raise ValueError(raw)
                except ValueError:
                    self._refuse(n, t0, 400, f"bad Content-Length {raw[:40]!r}")
                    return
                if length > server.max_body:
                    self._refuse(n, t0, 413, f"body of {length} bytes is over this server's {server.max_body}")
                    return
                try:
                    body = self.rfile.read(length) if length else b""
                except OSError:
                    return
                if len(body) < length:  # the client closed before sending what it announced
                    self._refuse(n, t0, 400, f"body ended after {len(body)} of its {length} bytes")
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, _error(f"no route {self.path}", "invalid_request_error"))
                    log.info("#%d POST %s -> 404 no route", n, self.path)
                    return
                server.counters.add("in_flight")
                try:
                    status, payload, what = server._respond(n, self.headers, body)
                finally:
                    server.counters.add("in_flight", -1)
                if payload is None:  # drop: close the connection, no status line
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:
                        pass
                    log.info("#%d POST %s -> no answer, connection closed: %s (%.0f ms)", n, self.path, what,
                             1000 * (time.perf_counter() - t0))
                    return
                self._send(status, payload)
                log.info("#%d POST %s -> %d %s (%.0f ms)", n, self.path, status, what,
                         1000 * (time.perf_counter() - t0))

        return Handler


def _error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _completion(model: str, messages: list[dict[str, Any]], prompt: list[dict[str, Any]]) -> dict[str, Any]:
    prompt_tokens = sum(len(_content(m).split()) for m in prompt)
    choices = []
    for i, m in enumerate(messages):
        msg = {"role": "assistant", "content": m.get("content"), "refusal": None}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        choices.append({"index": i, "message": msg, "logprobs": m.get("logprobs"),
                        "finish_reason": "tool_calls" if m.get("tool_calls") else "stop"})
    completion_tokens = sum(len(str(m.get("content") or "").split()) for m in messages)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "system_fingerprint": None,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class ServedJudge(NamedTuple):
    base_url: str
    counters: JudgeCounters


@contextmanager
def serve_judge(**kwargs: Any) -> Iterator[ServedJudge]:
    """Run a `JudgeServer` (keyword arguments as its constructor's) for the block; yields
    ``(base_url, counters)``, e.g. ``with serve_judge(delay=2) as (url, counters): ...``."""
    server = JudgeServer(**kwargs).start()
    try:
        yield ServedJudge(server.base_url, server.counters)
    finally:
        server.stop()
