"""`alpaca-eval`: the run's greedy answers against another run's answers to the same prompts, judged by alpaca_eval.

The scoring is alpaca_eval's own: `alpaca_eval.evaluate` with its pairwise annotator (default: its AlpacaEval 2.0
annotator ``weighted_alpaca_eval_gpt4_turbo``, option ``annotators_config``), its prompt template, completion
parser, output-order randomisation, caching and `get_winrate` metric. What this module adds:

- **Answers.** Ours: greedy generations of the run's model on its test prompts (`rm_score.run_answers`,
  ``<run_dir>/generations/test-<key>.jsonl``, shared with the ``rm`` benchmark). The reference's (option
  ``reference_run``, a run folder; the paper compares against ADPA's run), for the same prompts and the same
  decoding: from its ``generations/test-*.jsonl`` (written there by ``tvkd eval <reference> --bench rm`` or
  ``alpaca-eval``, or generated now from its saved ``model/`` into that folder), else from its ``outputs.jsonl``
  (the pipeline's greedy answers, matched by prompt text; refused when that run generated them at another
  ``max_new_tokens`` than ours, since answers cut at different lengths are not comparable). Option
  ``instructions`` judges AlpacaEval's own 805 instructions (or a file of them) instead of the run's test prompts.
  A prompt is the instruction alpaca_eval shows the
  judge: the user turn's text (a multi-message prompt is written out as ``role: content`` paragraphs).
- **Judge.** Any OpenAI-compatible endpoint: ``judge_base_url`` (else ``TVKD_JUDGE_BASE_URL``,
  ``OPENAI_BASE_URL``, OpenAI) and ``judge_model`` (else ``TVKD_JUDGE_MODEL``, else the annotator config's own
  model, ``gpt-4-1106-preview`` for AlpacaEval 2.0); the key from ``TVKD_JUDGE_API_KEY`` or ``OPENAI_API_KEY``
  (an explicit base URL without a key gets ``"EMPTY"``, as vLLM-style servers expect). alpaca_eval builds its
  clients from a client config (its ``client_configs`` mechanism); ours, in the run folder, names only
  `judge_client` as the client class, which reads the key from the environment when a request is made: the key
  enters no file and no alpaca_eval log line. Prompts are sent as chat messages (``requires_chatml``).
- **Caching.** alpaca_eval's own annotation cache (``caching_path``) lives in the run folder, one per annotator
  config and judge model: ``<run_dir>/alpaca_eval/<config>--<judge model>-<hash>/annotations_cache.json``. It is
  keyed by (instruction, output_1, output_2, annotator), so a rerun, or a comparison with another reference that
  shares answers, asks the judge nothing it already answered. A judge answer alpaca_eval cannot parse is cached as
  missing, as alpaca_eval does (``is_store_missing_annotations``), and counted in ``alpaca_eval/n_missing``;
  ``retry_missing`` asks for them again.
- **Faults.** alpaca_eval retries only rate limits and re-raises any other error (a timeout, an HTTP 500, a closed
  connection would end the evaluation with openai's traceback). Our client (`judge_client`) retries each request
  (``judge_tries`` attempts, exponential backoff) and hands a judgement that still fails back to alpaca_eval as a
  skipped example: the pair is missing, counted in ``alpaca_eval/judge_faults``, and dropped from the cache so the
  next run asks for it again. A key the endpoint refuses (401/403) stops all requests; that, or no judgement at
  all, is an error (`JudgeUnavailable`) with the reason. Next to the cache:
  the annotator config actually used (``configs.yaml``, model name included) and its prompt template; per
  reference, ``vs-<reference>-<hash>/`` holds alpaca_eval's ``annotations.json`` and ``leaderboard.csv`` and our
  ``result.json`` (metrics and the full record).

Metrics: ``alpaca_eval/win_rate`` and ``alpaca_eval/standard_error`` (percent, as alpaca_eval reports them),
``alpaca_eval/n`` (pairs judged, ``n_total``), ``alpaca_eval/n_wins``, ``n_wins_base``, ``n_draws``,
``discrete_win_rate``, ``avg_length`` (alpaca_eval's: characters of our answers), ``n_missing`` (prompts without a
judgement), and the record: ``judge_model``, ``judge_base_url`` (no credentials), ``annotator_config``, ``version``
(alpaca_eval's), ``reference_run``, ``reference_source``. The length-controlled win rate is not computed: alpaca_eval's
GLM (`get_length_controlled_winrate`) is fitted on its own 805 AlpacaEval instructions (per-instruction difficulty
looked up by row position, regularised toward annotations of gamed versions of its own GPT-4-turbo baseline,
downloaded from the hub); a comparison of two runs' answers on the run's test prompts has neither, so the metrics
carry ``alpaca_eval/length_controlled_win_rate_absent`` with that reason instead.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tvkd.benchmarks import BENCHMARKS, BenchContext, boolean, http_url, positive_int, positive_number
from tvkd.benchmarks.rm_score import (
    GENERATIONS_NAME,
    Chat,
    _Lazy,
    _truthy,
    answer_decoding,
    run_answers,
    run_prompts,
)
from tvkd.data.holdout import prompt_key

ENV_API_KEY = "TVKD_JUDGE_API_KEY"
ENV_MODEL = "TVKD_JUDGE_MODEL"
ENV_BASE_URL = "TVKD_JUDGE_BASE_URL"
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
CLIENT_CLASS = f"{__name__}.judge_client"
ALPACAEVAL_N_INSTRUCTIONS = 805
LC_ABSENT = ("alpaca_eval's length-controlled GLM is fitted on its own {n_ae} AlpacaEval instructions (instruction "
             "difficulty looked up by row position, regularised toward gamed versions of its GPT-4-turbo baseline, "
             "from the hub); here {n} test prompts of the run are judged against {ref}, so it cannot be computed")


# -- the judge's client (alpaca_eval imports it by name from the client config) ---------------------------------------


def judge_client(base_url: str | None = None, *, tries: int = 3, backoff: float = 2.0, max_backoff: float = 60.0,
                 **kwargs: Any) -> Any:
    """An ``openai.OpenAI`` client for alpaca_eval's ``openai_completions``: the key is read here, at request time,
    from ``TVKD_JUDGE_API_KEY`` or ``OPENAI_API_KEY``; an explicit base URL without a key gets ``"EMPTY"``.

    Its requests go through `_FaultTolerant`: alpaca_eval itself retries only rate limits and re-raises anything
    else (a timeout, an HTTP 500, a closed connection would end the evaluation), so each request is retried here
    (``tries`` attempts in all, ``backoff * 2**k`` seconds apart) and a judgement that still fails is handed back to
    alpaca_eval as a skipped example: it is missing, as with the mt-bench judge."""
    import openai

    key = os.environ.get(ENV_API_KEY) or os.environ.get("OPENAI_API_KEY")
    if not key:
        if not base_url or _sanitize_url(base_url) == OPENAI_DEFAULT_BASE_URL:
            raise ValueError(f"no API key for the alpaca-eval judge: set {ENV_API_KEY} (or OPENAI_API_KEY), or point "
                             "judge_base_url at an OpenAI-compatible endpoint that needs none")
        key = "EMPTY"
    kwargs["max_retries"] = 0  # the retries are ours (openai's would double them)
    return _FaultTolerant(openai.OpenAI(base_url=base_url, api_key=key, **kwargs), tries=int(tries),
                          backoff=float(backoff), max_backoff=float(max_backoff))


#: alpaca_eval's own way to skip an example whose request failed (`_openai_completion_helper`: an error with this
#: text gives the batch empty completions, which its parsers turn into a missing annotation).
SKIP_TEXT = "Please try again with a different prompt."


class JudgeFaults:
    """What the judge's requests met during one evaluation (shared by the clients alpaca_eval builds per batch)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.missing = 0  # judgements given up after every try (or skipped after a refused key)
        self.errors: dict[str, int] = {}
        self.last_error: str | None = None
        self.refused: str | None = None  # HTTP 401/403: the key is refused; nothing is asked after it
        self.failed_prompts: list[str] = []  # the prompt texts of the judgements given up

    def error(self, e: BaseException) -> None:
        key = os.environ.get(ENV_API_KEY) or os.environ.get("OPENAI_API_KEY")
        text = " ".join(str(e).split())[:300]
        if key and key != "EMPTY":
            text = text.replace(key, "<redacted>")
        with self.lock:
            self.errors[type(e).__name__] = self.errors.get(type(e).__name__, 0) + 1
            self.last_error = f"{type(e).__name__}: {text}"

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": self.requests, "retries": self.retries, "missing": self.missing,
                    "errors": dict(self.errors), "last_error": self.last_error, "refused": self.refused}


FAULTS = JudgeFaults()


class _Skip(Exception):
    pass


class _FaultTolerant:
    """Wraps an ``openai.OpenAI``: ``chat.completions.create`` and ``completions.create`` retried (timeouts,
    connection errors, 408/409/429/5xx), then skipped the way alpaca_eval skips an example; 401/403 stop all
    further requests. Everything else is the wrapped client's."""

    def __init__(self, client: Any, *, tries: int, backoff: float, max_backoff: float):
        self._client = client
        self._tries = max(1, tries)
        self._backoff = backoff
        self._max_backoff = max_backoff
        self.chat = _Namespace(completions=_Namespace(create=self._wrap(lambda: client.chat.completions.create)))
        self.completions = _Namespace(create=self._wrap(lambda: client.completions.create))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _wrap(self, method: Any) -> Any:
        def create(**kwargs: Any) -> Any:
            import time

            import openai

            faults = FAULTS
            for attempt in range(self._tries):
                if faults.refused:
                    break
                if attempt:
                    with faults.lock:
                        faults.retries += 1
                    time.sleep(min(self._max_backoff, self._backoff * 2 ** (attempt - 1)))
                with faults.lock:
                    faults.requests += 1
                try:
                    return method()(**kwargs)
                except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                    faults.error(e)
                    with faults.lock:
                        faults.refused = faults.refused or faults.last_error
                    break
                except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                        openai.InternalServerError) as e:
                    faults.error(e)
                except openai.APIStatusError as e:
                    faults.error(e)
                    if not (e.status_code in (408, 409) or e.status_code >= 500):
                        break  # a bad request: another try gets the same answer
            with faults.lock:
                faults.missing += 1
                faults.failed_prompts.append(json.dumps(kwargs.get("messages") or kwargs.get("prompt"),
                                                        ensure_ascii=False, default=str))
            raise openai.OpenAIError(f"judge request given up after {self._tries} tries ({faults.last_error}); "
                                     f"counted missing. {SKIP_TEXT}")

        return create


class _Namespace:
    def __init__(self, **attrs: Any):
        self.__dict__.update(attrs)


def _forget_failed(cache: Path, failed_prompts: Sequence[str]) -> int:
    """Drop from alpaca_eval's cache the missing annotations whose request failed (timeout, 5xx, closed connection),
    so that the next run asks for them again; a judge's unparseable answer stays cached as missing, as alpaca_eval
    keeps it. Returns how many were dropped."""
    if not failed_prompts or not cache.is_file():
        return 0
    try:
        rows = json.loads(cache.read_text())
    except ValueError:
        return 0
    failed = [json.loads(p) for p in failed_prompts]
    texts = [json.dumps(p, ensure_ascii=False) if not isinstance(p, str) else p for p in failed]

    def was_failed(row: dict[str, Any]) -> bool:
        pref = row.get("preference")
        if pref is not None and pref == pref and pref != -1:  # a judgement (alpaca_eval stores missing as -1)
            return False
        parts = [json.dumps(str(row.get(k, "")), ensure_ascii=False)[1:-1] for k in ("instruction", "output_1",
                                                                                      "output_2")]
        return any(all(p in t for p in parts) for t in texts)

    keep = [r for r in rows if not (isinstance(r, dict) and was_failed(r))]
    if len(keep) != len(rows):
        from tvkd.paths import atomic_write_text

        atomic_write_text(cache, json.dumps(keep, indent=2, ensure_ascii=False))
    return len(rows) - len(keep)


def _sanitize_url(url: str | None) -> str | None:
    """A base URL safe to store (no user, password, query or fragment): `tvkd.benchmarks.judge.sanitize_url`."""
    from tvkd.benchmarks.judge import sanitize_url

    return sanitize_url(url)


# -- answers ------------------------------------------------------------------------------------------------------


def instruction(prompt: Chat) -> str:
    """The instruction alpaca_eval shows the judge: a lone user turn's text, else the turns as paragraphs."""
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0]["content"])
    return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def _prompt_key(prompt: Chat) -> str:
    return prompt_key(list(prompt))  # as tvkd.evaluation.generations keys it


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a torn last line of a killed run
                continue
            if isinstance(row, dict):
                yield row


def reference_answers(ref_dir: Path, prompts: Sequence[Chat], decoding: dict[str, Any], *, progress: bool = False,
                      say: Any = print) -> tuple[list[str], list[str]]:
    """The reference run's answers to ``prompts`` (same decoding), and where they came from.

    In order: its ``generations/test-*.jsonl`` rows with this decoding (newest file first); answers generated now
    by its saved ``model/`` (into that folder, reused next time); its ``outputs.jsonl`` (by prompt text)."""
    from tvkd.evaluation.generations import decoding_key, generations

    if not ref_dir.is_dir():
        raise ValueError(f"reference_run {str(ref_dir)!r} is not a folder; give the run folder whose answers are "
                         "the reference (e.g. ADPA's run)")
    keys = [_prompt_key(p) for p in prompts]
    want, found, sources = set(keys), {}, []
    ours = decoding_key(decoding)
    files = sorted((ref_dir / "generations").glob(f"{GENERATIONS_NAME}-*.jsonl"),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files:
        used = False
        for row in _read_jsonl(path):
            k = row.get("key")
            if k in want and k not in found and isinstance(row.get("decoding"), dict) \
                    and decoding_key(row["decoding"]) == ours and isinstance(row.get("answer"), str):
                found[k], used = row["answer"], True
        if used:
            sources.append(f"generations/{path.name}")
    missing = [i for i, k in enumerate(keys) if k not in found]
    model_dir = ref_dir / "model"
    if missing and (model_dir / "config.json").is_file():
        from tvkd.modeling import load_causal_lm, load_tokenizer, model_digest

        say(f"  alpaca-eval: generating {len(missing)} reference answers with {model_dir} (saved in {ref_dir})")
        answers = generations(_Lazy(lambda: load_causal_lm(model_dir)), _Lazy(lambda: load_tokenizer(model_dir)),
                              [prompts[i] for i in missing], decoding, ref_dir, GENERATIONS_NAME,
                              model_key=model_digest(model_dir), progress=progress)
        for i, a in zip(missing, answers):
            found[keys[i]] = a
        sources.append(f"generations (from {model_dir.name}/)")
        missing = []
    if missing and (ref_dir / "outputs.jsonl").is_file():
        theirs_len = _outputs_max_new_tokens(ref_dir)
        if theirs_len is not None and theirs_len != int(decoding["max_new_tokens"]):
            raise ValueError(
                f"reference run {ref_dir}: its outputs.jsonl answers were generated with max_new_tokens {theirs_len} "
                f"(its eval.max_new_tokens) and ours with {decoding['max_new_tokens']}: answers cut at different "
                f"lengths are not comparable. Pass --option max_new_tokens={theirs_len}, or give the reference its "
                "weights (train.save_model: true) so that its answers are generated here at our length")
        by_text = {str(r["prompt"]): str(r["response"]) for r in _read_jsonl(ref_dir / "outputs.jsonl")
                   if "prompt" in r and "response" in r}
        hit = [i for i in missing if len(prompts[i]) == 1 and str(prompts[i][0].get("content")) in by_text]
        for i in hit:
            found[keys[i]] = by_text[str(prompts[i][0]["content"])]
        if hit:
            sources.append("outputs.jsonl")
        missing = [i for i in missing if keys[i] not in found]
    if missing:
        raise ValueError(
            f"reference run {ref_dir} has no answer to {len(missing)} of the {len(prompts)} prompts with this "
            f"decoding ({decoding}), e.g. {prompts[missing[0]]!r}; it keeps no model/ to generate them with and its "
            "outputs.jsonl lacks them. Give it answers first (tvkd eval <reference run> --bench rm, with the same "
            "max_new_tokens), or pick a reference run evaluated on the same test prompts")
    return [found[k] for k in keys], sources


def _outputs_max_new_tokens(ref_dir: Path) -> int | None:
    """The generation length of a run's outputs.jsonl (its config's eval.max_new_tokens), None when unknown."""
    import yaml

    try:
        saved = yaml.safe_load((ref_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict):
        return None
    from tvkd.config import EvalConfig

    value = (saved.get("eval") or {}).get("max_new_tokens", EvalConfig().max_new_tokens)
    return int(value) if value is not None else None


# -- alpaca_eval's annotator, set up in the run folder ----------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "x"


def prepare_annotator(root: Path, annotators_config: str, judge_model: str | None, *,
                      max_concurrency: int | None = None) -> tuple[Path, dict[str, Any], str]:
    """Write alpaca_eval's annotator config for this judge into ``root``: (configs.yaml path, config, judge model).

    ``annotators_config`` is the name of one of alpaca_eval's ``evaluators_configs`` or a path to a configs.yaml
    (or its folder); every annotator in it must use ``openai_completions``. The judge model replaces the config's
    ``model_name`` (default: the config's own); the prompt template is copied next to the config."""
    import yaml
    from alpaca_eval import constants, utils

    src = Path(annotators_config).expanduser()
    if src.exists():
        src = src / "configs.yaml" if src.is_dir() else src
        src_base = src.resolve().parents[1]  # alpaca_eval resolves prompt templates from here
        config_name = src.parent.name
    else:
        src = constants.EVALUATORS_CONFIG_DIR / annotators_config / "configs.yaml"
        src_base = constants.EVALUATORS_CONFIG_DIR
        config_name = annotators_config
        if not src.is_file():
            names = sorted(p.name for p in constants.EVALUATORS_CONFIG_DIR.iterdir() if (p / "configs.yaml").is_file())
            raise ValueError(f"unknown alpaca_eval annotators_config {annotators_config!r}: not a path and not one of "
                             f"alpaca_eval's: {', '.join(names)}")
    configs = utils.load_configs(src)
    model = judge_model
    for name, cfg in configs.items():
        if cfg.get("fn_completions", "openai_completions") != "openai_completions":
            raise ValueError(f"annotator {name!r} of {src} uses {cfg.get('fn_completions')!r}; this benchmark judges "
                             "through an OpenAI-compatible endpoint (fn_completions: openai_completions)")
        kw = dict(cfg.get("completions_kwargs") or {})
        model = model or os.environ.get(ENV_MODEL) or kw.get("model_name")
        if not model:
            raise ValueError(f"no judge model: pass judge_model (e.g. --option judge_model=gpt-4o-mini), set "
                             f"{ENV_MODEL}, or use an annotators_config that names one")
    assert model is not None
    folder = root / f"{_slug(config_name)}--{_slug(model)}-{_fingerprint(configs, model)}"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for name, cfg in configs.items():
        cfg = copy.deepcopy(cfg)  # (not a JSON round trip: parsers have int keys, e.g. outputs_to_match)
        template = Path(str(cfg["prompt_template"]))
        template_src = template if template.is_absolute() else src_base / template
        if not template_src.is_file():
            raise ValueError(f"annotator {name!r}: prompt template {template_src} not found")
        shutil.copyfile(template_src, folder / template_src.name)
        cfg["prompt_template"] = f"{folder.name}/{template_src.name}"  # relative to root, as alpaca_eval reads it
        kw = dict(cfg.get("completions_kwargs") or {})
        for k in ("client_config_path", "client_kwargs", "openai_api_keys", "openai_api_base",
                  "openai_organization_ids"):
            kw.pop(k, None)
        kw["model_name"] = model
        kw.setdefault("requires_chatml", True)  # chat messages, whatever the model's name looks like
        if max_concurrency:
            kw["num_procs"] = int(max_concurrency)
        cfg["completions_kwargs"] = kw
        out[name] = cfg
    path = folder / "configs.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    (folder / "openai_client.yaml").write_text(yaml.safe_dump({"default": [{"client_class": CLIENT_CLASS}]}))
    return path, out, model


def _stamp(path: Path) -> str | None:
    """The cache file's content hash (alpaca_eval rewrites it on every run, new judgements or not)."""
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _fingerprint(*parts: Any) -> str:
    from tvkd.paths import fingerprint

    return fingerprint("alpaca-eval", 1, *parts, length=8)


class _DropNoise(logging.Filter):
    """alpaca_eval's per-example warnings that say nothing here (an endpoint's price is unknown, and so on)."""

    NOISE = ("for computing price per token", "Saving_path is given but not 'auto'", "obscure error from openAI",
             "judge request given up after",  # ours, summed up once at the end instead
             "Error while parsing completion", "samples had no auto annotation",  # ditto: n_missing says it
             "We are using environment variables to construct the client configs")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


@contextlib.contextmanager
def _alpaca_eval_logging() -> Iterator[None]:
    """alpaca_eval sets the root logger to INFO when imported; keep the caller's level, show its warnings."""
    root = logging.getLogger()
    level, noise = root.level, _DropNoise()
    root.setLevel(logging.WARNING)
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)
        root.setLevel(level)


# -- the benchmark -------------------------------------------------------------------------------------------------


def load_instructions(source: str) -> tuple[list[Chat], list[str] | None, str]:
    """AlpacaEval's own instructions (option ``instructions``): (prompts, the file's reference outputs or None,
    where they came from). ``alpaca_eval``: its 805-instruction set, ``tatsu-lab/alpaca_eval`` in the local Hugging
    Face cache (this harness runs offline); else a JSON or JSONL file of rows with ``instruction`` (and ``output``,
    the reference answers, as in alpaca_eval's own ``alpaca_eval.json``)."""
    if source == "alpaca_eval":
        try:
            import datasets

            rows = list(datasets.load_dataset("tatsu-lab/alpaca_eval", "alpaca_eval")["eval"])
        except Exception as e:  # noqa: BLE001 - offline, not cached: say how to get it
            why = " ".join(str(e).split())[:160]
            raise ValueError(f"instructions=alpaca_eval: AlpacaEval's set (tatsu-lab/alpaca_eval) could not be loaded "
                             f"from the local Hugging Face cache ({type(e).__name__}: {why}); download its "
                             "alpaca_eval.json where the hub is reachable and give its path: "
                             "--option instructions=<alpaca_eval.json>") from None
        where = "tatsu-lab/alpaca_eval"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"instructions={source!r}: neither 'run', 'alpaca_eval' nor a JSON/JSONL file of rows "
                             "with an 'instruction'")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except ValueError:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = data if isinstance(data, list) else []
        where = str(path)
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not isinstance(r.get("instruction"), str)]
    if not rows or bad:
        raise ValueError(f"instructions {where}: row {bad[0] if bad else 0} has no 'instruction' text")
    prompts = [[{"role": "user", "content": r["instruction"]}] for r in rows]
    outputs = [r.get("output") for r in rows]
    return prompts, ([str(o) for o in outputs] if all(isinstance(o, str) for o in outputs) else None), where


@BENCHMARKS.register(
    "alpaca-eval",
    description="alpaca_eval pairwise win rate of greedy answers to the run's test prompts (or AlpacaEval's own "
                "instructions) against another run's answers (reference_run; the paper uses ADPA's), judged by an "
                "OpenAI-compatible endpoint",
    options={
        "reference_run": "run folder whose answers to the same prompts are the reference (required, unless the "
                         "instructions file carries reference outputs)",
        "instructions": "what to answer: run (default: the run's test prompts), alpaca_eval (AlpacaEval's 805 "
                        "instructions, from the local HF cache) or a JSON/JSONL file of {instruction, output} rows "
                        "(alpaca_eval.json: its outputs are the reference unless reference_run is given)",
        "judge_model": "judge model name (default: $TVKD_JUDGE_MODEL, else the annotator config's, "
                       "gpt-4-1106-preview for AlpacaEval 2.0)",
        "judge_base_url": "OpenAI-compatible base URL (default: $TVKD_JUDGE_BASE_URL, $OPENAI_BASE_URL, OpenAI); "
                          "key from $TVKD_JUDGE_API_KEY or $OPENAI_API_KEY",
        "annotators_config": "alpaca_eval annotator config name or configs.yaml path (default: alpaca_eval's "
                             "AlpacaEval 2.0 annotator, weighted_alpaca_eval_gpt4_turbo)",
        "max_concurrency": "judge requests in flight (default: alpaca_eval's, 5)",
        "judge_timeout": "seconds per judge request (default 120)",
        "judge_tries": "attempts per judgement in all (timeouts, closed connections, 429 and 5xx are retried; then "
                       "the pair counts as missing and is asked again on the next run) (default 3)",
        "retry_missing": "ask the judge again for pairs whose answer it could not be parsed before (default false: "
                         "alpaca_eval caches them as missing)",
        "max_new_tokens": "greedy answers' max new tokens, both sides (default 512)",
        "gen_batch_size": "generation batch size (default 64)",
    },
    values={"reference_run": lambda v: None if isinstance(v, str) and Path(v).is_dir() else
            "an existing run folder (the reference's answers: its generations/, model/ or outputs.jsonl)",
            "instructions": lambda v: None if v in ("run", "alpaca_eval") or (isinstance(v, str) and Path(v).is_file())
            else "run, alpaca_eval or an existing JSON/JSONL file",
            "judge_base_url": http_url, "max_concurrency": positive_int, "judge_timeout": positive_number,
            "judge_tries": positive_int, "retry_missing": boolean, "max_new_tokens": positive_int,
            "gen_batch_size": positive_int},
)
def alpaca_eval_bench(ctx: BenchContext) -> dict[str, Any]:
    from tvkd.benchmarks.judge import JudgeUnavailable

    global FAULTS
    source = str(ctx.option("instructions", "run") or "run")
    file_reference: list[str] | None = None
    if source == "run":
        prompts = run_prompts(ctx)
    else:
        prompts, file_reference, source = load_instructions(source)
    ref = ctx.option("reference_run")
    if not ref and file_reference is None:
        raise ValueError("alpaca-eval needs reference_run=<run folder> (the run whose answers ours are judged "
                         "against; the paper uses ADPA's)" + ("" if source == "run" else
                                                               f", or an instructions file with outputs ({source} "
                                                               "has none)"))
    ref_dir = Path(str(ref)).expanduser() if ref else None
    decoding = answer_decoding(ctx)
    with _alpaca_eval_logging():
        import alpaca_eval
        from alpaca_eval import constants

        root = Path(ctx.run_dir) / "alpaca_eval"
        config_name = str(ctx.option("annotators_config") or constants.DEFAULT_ANNOTATOR_CONFIG)
        concurrency = ctx.option("max_concurrency")
        config_path, config, judge_model = prepare_annotator(root, config_name, ctx.option("judge_model"),
                                                             max_concurrency=int(concurrency) if concurrency else None)
    if ref_dir is not None:
        theirs, sources = reference_answers(ref_dir, prompts, decoding, progress=ctx.progress, say=ctx.say)
        ref_name, ref_path = ref_dir.resolve().name, str(ref_dir.resolve())
    else:
        assert file_reference is not None
        theirs, sources = file_reference, [f"outputs of {source}"]
        ref_name, ref_path = f"reference-outputs-of-{_slug(Path(source).name)}", source
    ours = run_answers(ctx, prompts)
    base_url = ctx.option("judge_base_url") or os.environ.get(ENV_BASE_URL) or os.environ.get("OPENAI_BASE_URL")
    client_kwargs: dict[str, Any] = {"timeout": float(ctx.option("judge_timeout", 120)),
                                     "tries": max(1, int(ctx.option("judge_tries", 3)))}
    if base_url:
        client_kwargs["base_url"] = str(base_url)
    our_name = Path(ctx.run_dir).resolve().name
    if ref_name == our_name:
        ref_name += " (reference)"
    out_dir = config_path.parent / f"vs-{_slug(ref_name)}-{_fingerprint(ref_path, source)}"
    instructions = [instruction(p) for p in prompts]
    model_outputs = [{"instruction": x, "output": a, "generator": our_name} for x, a in zip(instructions, ours)]
    reference_outputs = [{"instruction": x, "output": a, "generator": ref_name} for x, a in zip(instructions, theirs)]
    ctx.say(f"  alpaca-eval: {len(prompts)} answers vs {ref_path} ({', '.join(sources)}), judge {judge_model} "
            f"at {_sanitize_url(base_url) or OPENAI_DEFAULT_BASE_URL}, annotator {config_name}")
    cache = config_path.parent / "annotations_cache.json"
    kwargs = dict(
        model_outputs=model_outputs, reference_outputs=reference_outputs, annotators_config=str(config_path),
        name=our_name, output_path=out_dir, precomputed_leaderboard=None, is_return_instead_of_print=True,
        fn_metric="get_winrate", sort_by="win_rate", is_cache_leaderboard=False, max_instances=None,
        caching_path=str(cache), is_store_missing_annotations=not _truthy(ctx.option("retry_missing", False)),
        annotation_kwargs={"is_ordered": True, "client_config_path": str(config_path.parent / "openai_client.yaml"),
                           "client_kwargs": client_kwargs})
    FAULTS = faults = JudgeFaults()
    with _alpaca_eval_logging():
        from alpaca_eval.main import evaluate

        before = _stamp(cache)
        try:
            leaderboard, _ = evaluate(**kwargs)
        except Exception as e:
            if faults.refused or faults.missing:  # alpaca_eval gave up on what our faults left it
                raise JudgeUnavailable(_unavailable(faults, len(prompts), judge_model, base_url)) from e
            raise
        finally:
            forgotten = _forget_failed(cache, faults.failed_prompts)
        if faults.refused:
            raise JudgeUnavailable(_unavailable(faults, len(prompts), judge_model, base_url))
        if _stamp(cache) != before and not forgotten:
            # New judgements were made. alpaca_eval's cache keeps ~10 significant digits of a preference; computing
            # the numbers again from it (no requests: all cached) makes this run report what every rerun will.
            leaderboard, _ = evaluate(**kwargs)
    row = leaderboard.loc[our_name].to_dict() if our_name in leaderboard.index else {"n_total": 0}
    n_total = int(row["n_total"])
    if n_total == 0:
        raise JudgeUnavailable(_unavailable(faults, len(prompts), judge_model, base_url))
    metrics: dict[str, Any] = {
        "alpaca_eval/win_rate": float(row["win_rate"]),
        "alpaca_eval/standard_error": float(row["standard_error"]),
        "alpaca_eval/n": n_total,
        "alpaca_eval/n_wins": int(row["n_wins"]),
        "alpaca_eval/n_wins_base": int(row["n_wins_base"]),
        "alpaca_eval/n_draws": int(row["n_draws"]),
        "alpaca_eval/discrete_win_rate": float(row["discrete_win_rate"]),
        "alpaca_eval/avg_length": int(row["avg_length"]),
        "alpaca_eval/n_missing": len(prompts) - n_total,
        "alpaca_eval/length_controlled_win_rate_absent": LC_ABSENT.format(
            n_ae=ALPACAEVAL_N_INSTRUCTIONS, n=len(prompts), ref=ref_name),
        "alpaca_eval/judge_model": judge_model,
        "alpaca_eval/judge_base_url": _sanitize_url(str(base_url)) if base_url else OPENAI_DEFAULT_BASE_URL,
        "alpaca_eval/annotator_config": config_name,
        "alpaca_eval/version": str(alpaca_eval.__version__),
        "alpaca_eval/reference_run": ref_path,
        "alpaca_eval/reference_source": ", ".join(sources),
        "alpaca_eval/instructions": "run test prompts" if source == "run" else source,
        "alpaca_eval/max_new_tokens": int(decoding["max_new_tokens"]),
        "alpaca_eval/judge_faults": faults.as_dict(),
    }
    if judge_model == _stand_in_model():
        metrics["alpaca_eval/stand_in_judge"] = ("judged by the testbed's loopback judge (the oracle r* on testbed "
                                                 "prompts, a hash of the answers elsewhere), not a real judge")
    record = {"metrics": metrics, "annotator_config": config, "decoding": decoding,
              "annotations": str(out_dir / "annotations.json"), "cache": str(cache)}
    (out_dir / "result.json").write_text(json.dumps(record, indent=2, default=str))
    if metrics["alpaca_eval/n_missing"]:
        why = (f"; {faults.missing} after failed requests ({faults.last_error}), asked again on the next run"
               if faults.missing else "")
        ctx.say(f"  alpaca-eval: {metrics['alpaca_eval/n_missing']} of {len(prompts)} pairs have no judgement"
                f"{why} (see {out_dir / 'annotations.json'})")
    return metrics


def _stand_in_model() -> str:
    from tvkd.benchmarks.judge_server import MODEL_NAME

    return MODEL_NAME


def _unavailable(faults: JudgeFaults, n: int, judge_model: str, base_url: Any) -> str:
    where = _sanitize_url(str(base_url)) if base_url else OPENAI_DEFAULT_BASE_URL
    if faults.refused:
        return (f"alpaca-eval: the judge at {where} refused the key ({faults.refused}); set a valid one in "
                f"{ENV_API_KEY} (or OPENAI_API_KEY)")
    return (f"alpaca-eval: none of the {n} pairs was judged by {judge_model} at {where} (last error: "
            f"{faults.last_error or 'answers alpaca_eval could not parse'}); no win rate. Check the endpoint and "
            "rerun: judgements already made are cached")
