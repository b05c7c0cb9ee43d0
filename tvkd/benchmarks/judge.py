"""An LLM-as-judge client for any benchmark: OpenAI-compatible endpoint or a Python callable, cached, bounded, retried.

    judge = JudgeClient.from_options(ctx.options, default_model="gpt-4o-mini", template_version="fastchat:...")
    results = judge.judge_many([messages, ...], parse=my_parser)   # one Judgement or None (missing) per prompt
    record = judge.record()                                          # store it with every number

Backends. ``JudgeClient(model, base_url, api_key)`` talks to any OpenAI-compatible ``/v1/chat/completions``
through the ``openai>=1`` client (``openai.OpenAI(base_url=..., api_key=...)``, its own retries off); the model,
base URL and key come from the arguments or the environment: ``TVKD_JUDGE_MODEL``, ``TVKD_JUDGE_BASE_URL``,
``TVKD_JUDGE_API_KEY`` (falling back to ``OPENAI_API_KEY``; a loopback or other explicit base URL without a key
gets the placeholder ``"EMPTY"``, as vLLM-style servers expect). ``JudgeClient(complete=fn)`` calls
``fn(messages) -> str`` instead (tests, local models). The key is held in memory only: it enters no cache
key, no record, no repr and no file.

Cache. Every accepted judgement is stored in ``cache_root()/"judgements"/"judgements.sqlite"`` (one sqlite
file, WAL mode, shared by threads and processes), keyed by the judge model, the full prompt messages, the
temperature, ``max_tokens`` and any extra request arguments (``logprobs``, ``tools``...), not by the base
URL: a rerun, or another run that asks the same question, makes no request. Only answers the caller's parser
accepted are stored; a cached answer the (possibly newer) parser rejects is asked again. Use a distinct
model name for a test endpoint (the loopback server of `judge_server` calls itself ``tvkd-oracle-judge``)
so its answers never stand in for a real judge's.

Failures never raise. A timeout, a connection error, an HTTP 408/409/429/5xx, an empty answer or one the
caller's parser rejects (it raises or returns None) is retried up to ``tries`` attempts in all, sleeping
``backoff * 2**k`` seconds (capped at ``max_backoff``) between them; any other error (400, 401, 404) is not
retried; after a 401 or 403 (the key is refused) nothing more is asked and the reason is kept in
``report.refused``. Whatever is still unanswered is *missing*: returned as None and counted in `JudgeReport`.
`JudgeClient.check` turns "nothing judged" (every prompt missing, or the key refused) into `JudgeUnavailable`.

Concurrency. ``judge_many`` runs at most ``max_concurrency`` requests at once (a thread pool, plus a
semaphore around each request, so concurrent callers share the limit); identical prompts in one call are
asked once.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tvkd.paths import cache_root, fingerprint

Messages = Sequence[Mapping[str, Any]]
CACHE_VERSION = 1
ENV_MODEL = "TVKD_JUDGE_MODEL"
ENV_BASE_URL = "TVKD_JUDGE_BASE_URL"
ENV_API_KEY = "TVKD_JUDGE_API_KEY"
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_PACKAGES = ("tvkd", "openai", "fschat", "nvidia-mtbench-evaluator", "alpaca_eval", "torch", "transformers")


class JudgeRejected(ValueError):
    """The judge answered, but not in a form the caller's parser accepts."""


class _Permanent(Exception):
    """An error that another try would not fix (bad request, bad key)."""


class _Refused(_Permanent):
    """The endpoint refuses the key (HTTP 401/403): no later request can succeed, so none is made."""


class JudgeUnavailable(RuntimeError):
    """No judgement could be had (every one missing, or the endpoint refused the key): the benchmark has no score."""


@dataclass
class JudgeReport:
    """What a client did: HTTP requests (every attempt), cache hits, retries, answers still missing."""

    requests: int = 0  # attempts that reached the backend (each retry counts)
    cache_hits: int = 0
    retries: int = 0  # attempts after the first, for any reason
    missing: int = 0  # prompts left without an accepted answer (returned as None)
    judged: int = 0  # prompts answered by a request in this session (cache hits not included)
    rejected: int = 0  # answers the parser rejected (each attempt counts)
    errors: dict[str, int] = field(default_factory=dict)  # failed attempts by error type
    last_error: str | None = None
    refused: str | None = None  # the endpoint refused the key (401/403): why; nothing was asked after it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Judgement:
    """One accepted judgement: the judge's text, the parser's value, and whether it came from the cache."""

    text: str
    value: Any
    cached: bool
    attempts: int  # requests this judgement took (0 when cached)


def sanitize_url(url: str | None) -> str | None:
    """A base URL safe to store: no user or password, no query (``?api-key=``), no fragment."""
    if not url:
        return url
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def package_versions(names: Sequence[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Installed versions of the named distributions (None when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


class JudgementCache:
    """A sqlite table of accepted judgements, safe for concurrent threads (one connection behind a lock)
    and processes (sqlite's own locking, WAL journal)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else cache_root() / "judgements" / "judgements.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=60.0, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:  # a file system without shared memory: the default journal works too
            pass
        self._db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                         "temperature REAL, text TEXT NOT NULL, created REAL NOT NULL)")

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT text FROM judgements WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, temperature: float, text: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgements (key, model, temperature, text, created) "
                             "VALUES (?, ?, ?, ?, ?)", (key, model, float(temperature), text, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _accept_any(text: str) -> str:
    return text


class JudgeClient:
    """A judge: ``judge(messages, parse)`` / ``judge_many([...], parse)``; see the module doc."""

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None, *,
                 complete: Callable[[list[dict[str, Any]]], str] | None = None, max_concurrency: int = 8,
                 timeout: float = 120.0, tries: int = 3, backoff: float = 2.0, max_backoff: float = 60.0,
                 temperature: float = 0.0, max_tokens: int | None = 2048, extra: Mapping[str, Any] | None = None,
                 cache: JudgementCache | str | os.PathLike | bool | None = True, template_version: str | None = None,
                 packages: Sequence[str] = DEFAULT_PACKAGES):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if tries < 1:
            raise ValueError(f"tries must be >= 1, got {tries}")
        self._complete = complete
        if complete is not None:
            self.model = model or f"callable:{getattr(complete, '__module__', '?')}." \
                                  f"{getattr(complete, '__qualname__', type(complete).__name__)}"
            self.base_url = None
            self.backend = "callable"
            self._api_key = None
        else:
            self.model = model or os.environ.get(ENV_MODEL) or ""
            if not self.model:
                raise ValueError(f"no judge model: pass judge_model (e.g. --option judge_model=gpt-4o-mini) or set "
                                 f"{ENV_MODEL}")
            self.base_url = base_url or os.environ.get(ENV_BASE_URL) or os.environ.get("OPENAI_BASE_URL") or None
            key = api_key or os.environ.get(ENV_API_KEY) or os.environ.get("OPENAI_API_KEY")
            if not key:
                if self.base_url is None:
                    raise ValueError(f"no API key for the judge: set {ENV_API_KEY} (or OPENAI_API_KEY), or point "
                                     f"{ENV_BASE_URL} / judge_base_url at an endpoint that needs none")
                key = "EMPTY"
            self._api_key = key
            self.backend = "openai"
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.tries = int(tries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = float(temperature)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.extra = dict(extra or {})
        self.template_version = template_version
        self.packages = tuple(packages)
        if cache is True or cache is None:
            self.cache: JudgementCache | None = JudgementCache()
        elif cache is False:
            self.cache = None
        elif isinstance(cache, JudgementCache):
            self.cache = cache
        else:
            self.cache = JudgementCache(cache)
        self.report = JudgeReport()
        self._report_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._client: Any = None
        self._client_lock = threading.Lock()

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, default_model: str | None = None, **kwargs: Any) -> JudgeClient:
        """A client from a benchmark's options: ``judge_model``, ``judge_base_url``, ``max_concurrency``,
        ``judge_timeout``, ``judge_tries`` (each falling back to the environment, then to the defaults)."""
        model = options.get("judge_model") or os.environ.get(ENV_MODEL) or default_model
        kw: dict[str, Any] = {}
        for opt, arg, conv in (("max_concurrency", "max_concurrency", int), ("judge_timeout", "timeout", float),
                               ("judge_tries", "tries", int)):
            if options.get(opt) is not None:
                kw[arg] = conv(options[opt])
        return cls(model=model, base_url=options.get("judge_base_url"), **{**kw, **kwargs})

    def __repr__(self) -> str:  # never the key
        return f"JudgeClient(model={self.model!r}, base_url={sanitize_url(self.base_url)!r}, backend={self.backend!r})"

    # ---------------------------------------------------------------------------------------------- record

    def record(self) -> dict[str, Any]:
        """What to store next to every number this judge produced (no credentials)."""
        base = self.base_url
        if self.backend == "openai" and self._client is not None:
            base = str(self._client.base_url)
        return {
            "judge_model": self.model,
            "base_url": sanitize_url(base or OPENAI_DEFAULT_BASE_URL) if self.backend == "openai" else None,
            "backend": self.backend,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "template_version": self.template_version,
            "packages": package_versions(self.packages),
            "report": self.report.as_dict(),
        }

    # ---------------------------------------------------------------------------------------------- judging

    def cache_key(self, messages: Messages) -> str:
        return fingerprint("judgement", CACHE_VERSION, self.model, [dict(m) for m in messages], self.temperature,
                           self.max_tokens, self.extra, length=32)

    def judge(self, messages: Messages, parse: Callable[[str], Any] | None = None) -> Judgement | None:
        """One judgement (from the cache, or asked with retries), or None when it stays missing."""
        return self.judge_many([messages], parse, progress=False)[0]

    def judge_many(self, prompts: Sequence[Messages], parse: Callable[[str], Any] | None = None, *,
                   progress: bool = False, desc: str = "judge") -> list[Judgement | None]:
        """One Judgement or None (missing) per prompt, in order; at most ``max_concurrency`` requests at once."""
        parse = parse or _accept_any
        keys = [self.cache_key(p) for p in prompts]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        unique = list(first.items())
        results: dict[str, Judgement | None] = {}
        if len(unique) <= 1 or self.max_concurrency == 1:
            for k, i in unique:
                results[k] = self._one(k, prompts[i], parse)
        else:
            from tqdm.auto import tqdm

            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(unique)),
                                    thread_name_prefix="tvkd-judge") as pool:
                futures = {k: pool.submit(self._one, k, prompts[i], parse) for k, i in unique}
                for k, fut in tqdm(futures.items(), desc=desc, disable=not progress, leave=False):
                    results[k] = fut.result()
        return [results[k] for k in keys]

    def _count(self, **deltas: int) -> None:
        with self._report_lock:
            for name, d in deltas.items():
                setattr(self.report, name, getattr(self.report, name) + d)

    def _error(self, e: BaseException) -> None:
        name = type(e).__name__
        message = str(e)
        if self._api_key and self._api_key != "EMPTY":  # a server may echo the key back in an error
            message = message.replace(self._api_key, "<redacted>")
        with self._report_lock:
            self.report.errors[name] = self.report.errors.get(name, 0) + 1
            self.report.last_error = f"{name}: {message[:300]}"

    def _one(self, key: str, messages: Messages, parse: Callable[[str], Any]) -> Judgement | None:
        try:
            if self.cache is not None:
                text = self.cache.get(key)
                if text is not None:
                    value = _try_parse(parse, text)
                    if value is not None:
                        self._count(cache_hits=1)
                        return Judgement(text=text, value=value, cached=True, attempts=0)
            msgs = [dict(m) for m in messages]
            for attempt in range(self.tries):
                if self.report.refused:
                    break
                if attempt:
                    self._count(retries=1)
                    time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
                self._count(requests=1)
                try:
                    with self._slots:
                        text = self._request(msgs)
                except _Permanent as e:
                    self._error(e.__cause__ or e)
                    if isinstance(e, _Refused):
                        with self._report_lock:
                            self.report.refused = self.report.refused or self.report.last_error
                    break
                except Exception as e:  # noqa: BLE001 - timeouts, connection errors, 5xx: try again
                    self._error(e)
                    continue
                value = _try_parse(parse, text) if text else None
                if value is None:
                    self._count(rejected=1)
                    self._error(JudgeRejected(f"answer rejected by the parser: {str(text)[:200]!r}"))
                    continue
                if self.cache is not None:
                    self.cache.put(key, self.model, self.temperature, text)
                self._count(judged=1)
                return Judgement(text=text, value=value, cached=False, attempts=attempt + 1)
        except Exception as e:  # noqa: BLE001 - a cache or bookkeeping failure: missing, never raised
            self._error(e)
        self._count(missing=1)
        return None

    def _openai(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout,
                                             max_retries=0)
            return self._client

    def _request(self, messages: list[dict[str, Any]]) -> str | None:
        if self._complete is not None:
            return self._complete(messages)
        import openai

        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature,
                                  "n": 1, **self.extra}
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        try:
            resp = self._openai().chat.completions.create(**kwargs)
        except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                openai.InternalServerError):
            raise
        except openai.APIStatusError as e:
            if e.status_code in (408, 409, 429) or e.status_code >= 500:
                raise
            if e.status_code in (401, 403):
                raise _Refused(str(e)) from e
            raise _Permanent(str(e)) from e
        choice = resp.choices[0]
        content = choice.message.content
        if content is None and getattr(choice.message, "tool_calls", None):
            content = choice.message.tool_calls[0].function.arguments
        return content

    def check(self, asked: int, benchmark: str) -> None:
        """Raise `JudgeUnavailable` when none of ``asked`` judgements came back (or the key was refused)."""
        r = self.report
        if r.refused:
            raise JudgeUnavailable(f"{benchmark}: the judge at {sanitize_url(self.base_url) or 'its endpoint'} refused "
                                   f"the key ({r.refused}); set a valid one in {ENV_API_KEY} (or OPENAI_API_KEY)")
        if asked and r.missing >= asked:
            raise JudgeUnavailable(f"{benchmark}: none of the {asked} judgements came back from {self.model} at "
                                   f"{sanitize_url(self.base_url) or self.backend} after {self.tries} tries each "
                                   f"(last error: {r.last_error}); no score. Check the endpoint and rerun: "
                                   "judgements already made are cached")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.cache is not None:
            self.cache.close()


def _try_parse(parse: Callable[[str], Any], text: str) -> Any:
    try:
        return parse(text)
    except Exception:  # noqa: BLE001 - any parser failure is a rejection
        return None
