"""`tvkd eval`: run benchmarks on a finished run (or a config) and merge their metrics into its store.

A target is a run folder of the results store (its config.yaml and, for a trained run, its saved model in
``model/``: train with ``train.save_model: true``) or a run config file (run first if needed, keeping the
model). Every name and option is checked before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tvkd.benchmarks import BENCHMARKS, BenchContext


def parse_options(items: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE, e.g. judge_model=gpt-4o-mini")
        out[key] = yaml.safe_load(value)
    return out


def evaluate(target: str | Path, benches: list[str], options: dict[str, Any], *, results: str | Path | None = None,
             progress: bool = True, say: Any = print) -> tuple[Path, dict[str, Any]]:
    """Run `benches` on `target`; returns (run folder, merged metrics)."""
    from dataclasses import replace

    import yaml

    from tvkd.config import config_from_dict, load_config
    from tvkd.results import ResultsStore, RunRecord

    for name in benches:  # unknown names first, with a "did you mean"
        BENCHMARKS.get(name)
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
    saved.pop("inputs", None)  # the run's identity, not a config key
    cfg = config_from_dict(saved, where=str(run_dir / "config.yaml"))
    from tvkd.pipeline import resolve, uses_testbed

    model_dir = Path(resolve(cfg.models.student, dict(cfg.testbed) or None, progress)) if cfg.eval_only \
        else run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{run_dir} kept no weights (no {model_dir}); rerun it with them: "
                         f"tvkd run <config> --set train.save_model=true --force")
    prompts = _test_prompts(run_dir, cfg, progress=progress, say=say)
    ctx = BenchContext(run_dir=run_dir, model_dir=model_dir, options=options, test_prompts=prompts,
                       testbed=uses_testbed(cfg), progress=progress, say=say, config=cfg)
    new: dict[str, Any] = {}
    for name in benches:
        say(f"[{name}] on {model_dir}")
        new.update(BENCHMARKS.get(name)(ctx))
        store.merge_metrics(run_dir, new)  # after each benchmark: an interruption keeps what finished
    return run_dir, store.merge_metrics(run_dir, {})


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
