"""`tvkd eval`: run benchmarks on a finished run (or a config) and merge their metrics into its store.

A target is a run folder of the results store (its config.yaml and, for a trained run, its saved model in
``model/``: train with ``train.save_model: true``) or a run config file (run first if needed, keeping the
model). Every name and option is checked before any model loads: each benchmark declares its options, an
unknown one is an error with a "did you mean", and a secret is never an option (it would be stored beside the
results and shown in the process list).

Each benchmark runs on its own: one that fails is recorded in metrics.json (``eval_failed/<bench>``: the reason,
the options, when) and the traceback in ``<run>/eval/<bench>.error.txt``; the others still run and the command
ends non-zero naming what failed. A benchmark that succeeds replaces all of its earlier results at once (the keys
it returned last time, listed in its record, and every key under its own prefix), so no number of an older
evaluation stays beside a newer one; its record ``eval/<bench>`` (the keys, the options used, the sample size,
seconds, time) is stored beside them and its full result in ``<run>/eval/<bench>.json``.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvkd.benchmarks import BENCHMARKS, BenchContext, check_values

#: Option names that hold a credential: refused, whatever the benchmark (keys come from the environment).
SECRET_NAME = re.compile(r"(api[_-]?key|secret|passw(or)?d|credential|bearer|authoriz|(^|[_-])token$|^auth$)",
                         re.IGNORECASE)
#: Option values that look like a key (OpenAI's sk-..., a bearer header).
SECRET_VALUE = re.compile(r"^\s*(sk-[A-Za-z0-9_-]{8,}|bearer\s+\S+)", re.IGNORECASE)
RECORD_PREFIX = "eval/"  # eval/<bench>: what the benchmark's current results are (keys, options, n, when)
FAILED_PREFIX = "eval_failed/"  # eval_failed/<bench>: its last failure, until it succeeds again


class BenchmarksFailed(RuntimeError):
    """Some benchmarks failed (the others ran and were merged); the message names each with its reason."""


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` items, each value read as YAML the way run configs are (`tvkd.config.load_yaml`: 1e-5 is a
    number)."""
    from tvkd.config import load_yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE, e.g. judge_model=gpt-4o-mini")
        try:
            out[key.strip()] = load_yaml(value)
        except Exception as e:  # noqa: BLE001 - yaml.YAMLError and its subclasses, without importing yaml here
            raise ValueError(f"--option {item!r}: the value is not valid YAML "
                             f"({getattr(e, 'problem', None) or e})") from None
    return out


def declared_options(name: str) -> dict[str, str]:
    """A benchmark's options as it registered them (name -> help)."""
    return dict(BENCHMARKS.meta(name).get("options") or {})


def option_owners() -> dict[str, list[str]]:
    """Every declared option name -> the benchmarks that declare it (an option given once goes to all of them)."""
    owners: dict[str, list[str]] = {}
    for bench in sorted(BENCHMARKS.names()):
        for opt in declared_options(bench):
            owners.setdefault(opt, []).append(bench)
    return owners


def check_options(benches: Sequence[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each benchmark's own options out of the command line's; ValueError for a secret or an option that none of
    ``benches`` declares (with a "did you mean" and, if another benchmark declares it, which)."""
    mine = {b: declared_options(b) for b in benches}
    known = sorted({o for opts in mine.values() for o in opts})
    for key, value in options.items():
        if SECRET_NAME.search(key) or (isinstance(value, str) and SECRET_VALUE.search(value)):
            raise ValueError(f"--option {key}: a secret is never passed as an option (options are stored beside the "
                             "results and visible in the process list); put the judge's key in TVKD_JUDGE_API_KEY "
                             "(or OPENAI_API_KEY) in the environment")
        if any(key in opts for opts in mine.values()):
            continue
        others = option_owners().get(key)
        if others:
            raise ValueError(f"--option {key}: not an option of {', '.join(benches)} (it is one of "
                             f"{', '.join(others)}); add that benchmark to --bench or drop the option")
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"--option {key}: unknown option of {', '.join(benches)}{hint} (their options: "
                         f"{', '.join(known) or 'none'}; `tvkd eval --list` explains each)")
    return {b: {k: v for k, v in options.items() if k in mine[b]} for b in benches}


def list_text() -> str:
    """`tvkd eval --list`: each benchmark, its options, and which options are shared by several benchmarks."""
    owners = option_owners()
    lines = []
    for name in sorted(BENCHMARKS.names()):
        lines.append(f"{name:<16} {BENCHMARKS.meta(name).get('description', '')}")
        for opt, text in declared_options(name).items():
            also = [b for b in owners[opt] if b != name]
            shared = f" [shared with {', '.join(also)}: one --option sets it for all]" if also else ""
            lines.append(f"    --option {opt}=...: {text}{shared}")
    lines.append("Keys come from the environment (TVKD_JUDGE_API_KEY or OPENAI_API_KEY), never from an option.")
    return "\n".join(lines)


@dataclass
class Outcome:
    """What one benchmark did: its metrics, or why it failed."""

    name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    record_file: Path | None = None


@dataclass
class Evaluation:
    run_dir: Path
    metrics: dict[str, Any]  # the run's metrics.json after every merge
    outcomes: list[Outcome]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    def failure_message(self) -> str:
        bad = self.failed
        return (f"{len(bad)} of {len(self.outcomes)} benchmarks failed: "
                + "; ".join(f"{o.name} ({o.error})" for o in bad)
                + f" (recorded in {self.run_dir / 'metrics.json'} under {FAILED_PREFIX}<bench>; the others' results "
                  "were merged)")


def bench_prefixes(name: str) -> tuple[str, ...]:
    """The metric-key prefixes a benchmark owns: its name (``mt-bench`` -> ``mt_bench/``) and any it declares."""
    own = BENCHMARKS.meta(name).get("prefixes") or ()
    return tuple(dict.fromkeys([f"{name.replace('-', '_')}/", f"{name}/", *own]))


def sample_size(metrics: dict[str, Any]) -> int | None:
    """The benchmark's sample size: its ``…/n`` key (the first one, when several)."""
    for key, value in metrics.items():
        if key.endswith("/n") and isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _reason(e: BaseException) -> str:
    """One line: the error's type and message, and where it was raised when the message says nothing."""
    text = " ".join(str(e).split())
    if len(text) > 600:
        text = text[:600] + "..."
    if not text:
        frames = traceback.extract_tb(e.__traceback__)
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        return f"{type(e).__name__}{where} (no message)"
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def report_lines(outcome: Outcome, run_dir: Path) -> list[str]:
    """The console lines of one benchmark: every number it returned; records (mappings, lists, long text) are
    named with the file that holds them."""
    if outcome.error is not None:
        return [f"  FAILED: {outcome.error}"]
    where = outcome.record_file.relative_to(run_dir) if outcome.record_file else "metrics.json"
    lines = []
    for key in sorted(outcome.metrics):
        value = outcome.metrics[key]
        if isinstance(value, dict | list | tuple):
            lines.append(f"  {key}: ({type(value).__name__} of {len(value)}, in {where})")
        elif isinstance(value, str) and len(value) > 100:
            lines.append(f"  {key}: {value[:80]}... (in {where})")
        else:
            lines.append(f"  {key}: {format_value(value)}")
    return lines


def evaluate(target: str | Path, benches: list[str], options: dict[str, Any], *, results: str | Path | None = None,
             progress: bool = True, say: Callable[[str], None] = print, threads: int | None = None,
             strict: bool = True) -> Evaluation:
    """Run `benches` on `target`, each on its own (a failure is recorded and the rest run); see the module doc.
    With ``strict`` (the default for callers in Python), failures raise `BenchmarksFailed` once every benchmark
    has run and been merged; ``tvkd eval`` passes False and reports them itself."""
    from dataclasses import replace

    import yaml

    from tvkd.config import config_from_dict, load_config
    from tvkd.results import ResultsStore, RunRecord

    for name in benches:  # unknown names first, with a "did you mean"
        BENCHMARKS.get(name)
    if len(set(benches)) != len(benches):
        raise ValueError(f"--bench names a benchmark twice: {','.join(benches)}")
    per_bench = check_options(benches, options)
    for name in benches:  # values too, before a model loads or a judge is asked (a typo is no recorded failure)
        check_values(name, per_bench[name], BENCHMARKS.meta(name).get("values") or {})
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(int(threads))
    store = ResultsStore(results)
    target = Path(target)
    if target.is_file():
        cfg = load_config(target)
        if not cfg.eval_only and not cfg.train.save_model:
            cfg = replace(cfg, train=replace(cfg.train, save_model=True))
        from tvkd.pipeline import execute

        run_dir = execute(cfg, store=store, progress=progress).run_dir
    elif (target / "config.yaml").is_file():
        run_dir = target
    else:
        raise ValueError(f"{target}: neither a run folder of the results store (it has no config.yaml) nor a "
                         "run config file")
    record = RunRecord.read(run_dir)
    if not record.complete:
        raise ValueError(f"{run_dir} is not a finished run (state {record.state!r}); run it first")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key in ("inputs", "processes", "loss_defaults"):  # the run's identity (`run_identity`), not config keys
        saved.pop(key, None)
    cfg = config_from_dict(saved, where=str(run_dir / "config.yaml"))
    from tvkd.pipeline import resolve, uses_testbed

    model_dir = Path(resolve(cfg.models.student, dict(cfg.testbed) or None, progress)) if cfg.eval_only \
        else run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{run_dir} kept no weights (no {model_dir}); rerun it with them: "
                         f"tvkd run <config> --set train.save_model=true --force")
    prompts_error = None
    try:  # a run whose test prompts cannot be rebuilt still gets the benchmarks that need none
        prompts = _test_prompts(run_dir, cfg, progress=progress, say=say)
    except Exception as e:  # noqa: BLE001 - recorded; the benchmarks that need prompts fail with it
        prompts, prompts_error = [], _reason(e)
        say(f"the run's test prompts could not be read: {prompts_error}")
    ctx = BenchContext(run_dir=run_dir, model_dir=model_dir, options={}, test_prompts=prompts,
                       testbed=uses_testbed(cfg), progress=progress, say=say, config=cfg, prompts_error=prompts_error)
    outcomes = []
    for name in benches:
        say(f"[{name}] on {model_dir}")
        ctx.options = dict(per_bench[name])
        outcome = _run_one(store, run_dir, name, ctx)
        for line in report_lines(outcome, run_dir):
            say(line)
        outcomes.append(outcome)
    ev = Evaluation(run_dir, store.merge_metrics(run_dir, {}), outcomes)
    if strict and ev.failed:
        raise BenchmarksFailed(ev.failure_message())
    return ev


def _run_one(store: Any, run_dir: Path, name: str, ctx: BenchContext) -> Outcome:
    """One benchmark, isolated: its results replace its earlier ones at once, or its failure is recorded."""
    from tvkd.paths import atomic_write_text

    t0 = time.perf_counter()
    when = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    folder = run_dir / "eval"
    try:
        metrics = dict(BENCHMARKS.get(name)(ctx) or {})
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of one benchmark is recorded; the others run
        reason = _reason(e)
        error_file = folder / f"{name}.error.txt"
        atomic_write_text(error_file, "".join(traceback.format_exception(e)))
        store.merge_metrics(run_dir, {f"{FAILED_PREFIX}{name}": {
            "error": reason, "options": ctx.options, "at": when, "traceback": str(error_file.relative_to(run_dir))}})
        return Outcome(name, error=reason, seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    record = {"keys": sorted(metrics), "options": ctx.options, "n": sample_size(metrics), "seconds": round(seconds, 3),
              "at": when}
    record_file = folder / f"{name}.json"
    atomic_write_text(record_file, json.dumps({**record, "metrics": metrics}, indent=2, sort_keys=True,
                                              ensure_ascii=False, default=str) + "\n")
    try:
        previous = json.loads((run_dir / "metrics.json").read_text()).get(f"{RECORD_PREFIX}{name}") or {}
    except (OSError, ValueError, AttributeError):
        previous = {}
    old_keys = previous.get("keys") if isinstance(previous, dict) else None
    store.merge_metrics(run_dir, {**metrics, f"{RECORD_PREFIX}{name}": record},
                        replace=[*(old_keys or []), f"{FAILED_PREFIX}{name}"], replace_prefixes=bench_prefixes(name))
    return Outcome(name, metrics=metrics, seconds=seconds, record_file=record_file)


def _test_prompts(run_dir: Path, cfg: Any = None, *, progress: bool = False,
                  say: Any = lambda msg: None) -> list[list[dict[str, Any]]]:
    """The run's test prompts as whole chats (system message and earlier turns included), in outputs.jsonl's order.

    outputs.jsonl holds each prompt's last user message; the chats are the run's own held-out pairs
    (``data.test_source``, ``test_split``, ``test_limit``, ``adapter`` of its config), taken in the order
    the generation evaluator took them (`unique_prompts`), and checked against outputs.jsonl prompt by
    prompt. A run whose data no longer gives those prompts (changed in place, or unreadable) falls back to
    the last user messages alone, and says so.
    """
    path = run_dir / "outputs.jsonl"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    last = [r["prompt"] for r in rows]
    single = [[{"role": "user", "content": p}] for p in last]
    if cfg is None:
        return single
    try:
        chats = _run_test_chats(cfg, progress)
    except Exception as e:  # noqa: BLE001 - any failure to reload the data: the stated fallback
        say(f"  test prompts: the run's test data could not be reloaded ({e}); using the last user messages only")
        return single
    if [c[-1]["content"] for c in chats[: len(last)]] != last:
        say("  test prompts: the run's test data no longer gives the prompts of its outputs.jsonl (changed in "
            "place?); using the last user messages only")
        return single
    return [list(c) for c in chats[: len(last)]]


def _run_test_chats(cfg: Any, progress: bool) -> list[list[dict[str, Any]]]:
    """The unique prompts of the run's held-out pairs, as the generation evaluator saw them."""
    from tvkd.data import load_preferences
    from tvkd.evaluation.generation import unique_prompts
    from tvkd.pipeline import resolve

    testbed = dict(cfg.testbed) or None
    source = resolve(cfg.data.test_source, testbed, progress) or resolve(cfg.data.source, testbed, progress)
    res = load_preferences(source, split=cfg.data.test_split, adapter=cfg.data.adapter, limit=cfg.data.test_limit)
    return unique_prompts(res.examples)
