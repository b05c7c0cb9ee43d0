"""One run, end to end: data -> tokenize -> caches -> train -> evaluate -> results store.

Every stage is keyed by a content hash of its inputs (tokenized data, caches, the run itself),
so a rerun skips what is done: a finished run is not recomputed, a killed one is redone clean.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvkd.config import RunConfig
from tvkd.losses import LOSSES, build_config
from tvkd.paths import fingerprint

log = logging.getLogger(__name__)

TESTBED_PREFIX = "testbed:"
TESTBED_PARTS = {
    "student_sft": "student_sft_dir", "teacher_sft": "teacher_sft_dir", "teacher_dpo": "teacher_dpo_dir",
    "student_dpo": "student_dpo_dir", "tokenizer": "tokenizer_dir", "pref_train": "pref_train",
    "pref_test": "pref_test", "student_pref_train": "student_pref_train", "student_pref_test": "student_pref_test",
    "sft_train": "sft_train", "test_prompts": "test_prompts",
}


class Echo:
    """Prints one line per stage with its wall time (what a user watching a long run wants)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)


def uses_testbed(cfg: RunConfig) -> bool:
    vals = [cfg.models.student, cfg.models.reference, cfg.models.teacher, cfg.models.teacher_reference,
            cfg.data.source, cfg.data.test_source]
    return any(isinstance(v, str) and v.startswith(TESTBED_PREFIX) for v in vals)


_TESTBEDS: dict[str, Any] = {}


def get_testbed(overrides: dict[str, Any] | None = None, progress: bool = True) -> Any:
    from tvkd.testbed import TestbedConfig, build_testbed

    key = fingerprint(overrides or {})
    if key not in _TESTBEDS:
        _TESTBEDS[key] = build_testbed(TestbedConfig(**(overrides or {})), progress=progress)
    return _TESTBEDS[key]


def resolve(value: str | None, testbed_overrides: dict[str, Any] | None = None, progress: bool = True) -> str | None:
    """`testbed:<part>` -> the local path of that part (building the testbed if needed)."""
    if value is None or not value.startswith(TESTBED_PREFIX):
        return value
    part = value[len(TESTBED_PREFIX):]
    if part not in TESTBED_PARTS:
        import difflib

        close = difflib.get_close_matches(part, list(TESTBED_PARTS), n=1)
        raise ValueError(f"unknown testbed part {part!r}; valid: {', '.join(TESTBED_PARTS)}"
                         + (f". Did you mean {close[0]!r}?" if close else ""))
    return str(getattr(get_testbed(testbed_overrides, progress), TESTBED_PARTS[part]))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_key(cfg: RunConfig) -> dict[str, Any]:
    """What identifies a run's results: the whole config."""
    return cfg.to_dict()


def execute(cfg: RunConfig, *, store: Any = None, force: bool = False, progress: bool = True,
            echo: Echo | None = None, testbed: dict[str, Any] | None = None) -> Any:
    """Train and evaluate one configuration, or return its stored record if it already finished."""
    from tvkd.results import ResultsStore

    echo = echo or Echo(progress)
    # Validate names and options before any model is loaded or any testbed stage is built.
    build_config(LOSSES.get(cfg.loss.name), cfg.loss.options)
    store = store or ResultsStore()
    key = run_key(cfg)
    if testbed:
        key = {**key, "testbed": testbed}
    if not force and store.is_complete(key, study=cfg.study, name=cfg.name):
        rec = store.load(key, study=cfg.study, name=cfg.name)
        echo(f"[{cfg.name}] already complete: {rec.run_dir} (nothing to do)")
        return rec
    handle = store.start(key, study=cfg.study, name=cfg.name)
    echo(f"[{cfg.name}] running in {handle.run_dir}")
    try:
        metrics, outputs = _train_and_evaluate(cfg, handle.run_dir, echo, progress, testbed)
        if outputs is not None:
            handle.write_outputs(outputs)
        handle.write_metrics(metrics)
        handle.complete()
    except BaseException as e:
        handle.fail(e)
        raise
    rec = store.load(key, study=cfg.study, name=cfg.name)
    echo(f"[{cfg.name}] done in {sum(echo.timings.values()):.1f}s: " + ", ".join(
        f"{k}={v:.4f}" for k, v in metrics.items() if k in ("margin_accuracy", "oracle_score", "train_loss")
    ))
    return rec


def _load_pairs(source: str, split: str, limit: int | None, adapter: str | None, echo: Echo) -> Any:
    from tvkd.data import load_preferences

    res = load_preferences(source, split=split, adapter=adapter, limit=limit)
    echo(f"  data {source} [{split}]: {res.summary()}")
    if not res.examples:
        raise ValueError(f"{source} [{split}] has no usable preference pairs ({res.summary()})")
    return res


def _train_and_evaluate(cfg: RunConfig, run_dir: Path, echo: Echo, progress: bool,
                        testbed: dict[str, Any] | None) -> tuple[dict[str, Any], list | None]:
    """data -> tokenize -> assemble (caches, prepare) -> train -> evaluate; (metrics, generations)."""
    import datasets

    from tvkd.assemble import CacheOptions, assemble_training_set
    from tvkd.cache.teacher import aux_specs
    from tvkd.evaluation import EvalContext, run_evaluators
    from tvkd.evaluation.metrics import teacher_signal
    from tvkd.modeling import ModelSource, load_tokenizer, teacher_vocab_size
    from tvkd.tokenize import tokenize_preferences
    from tvkd.training.trainer import train_policy

    if not progress:
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    m = cfg.models
    student = resolve(m.student, testbed, progress)
    reference = resolve(m.reference, testbed, progress) or student
    teacher = resolve(m.teacher, testbed, progress)
    source = resolve(cfg.data.source, testbed, progress)
    test_source = resolve(cfg.data.test_source, testbed, progress) or source
    loss = LOSSES.get(cfg.loss.name)()
    loss_cfg = build_config(type(loss), cfg.loss.options)
    needs = loss.needs(loss_cfg)
    metrics: dict[str, Any] = {}

    with echo.stage("data"):
        train_res = _load_pairs(source, cfg.data.split, cfg.data.limit, cfg.data.adapter, echo)
        test_res = _load_pairs(test_source, cfg.data.test_split, cfg.data.test_limit, cfg.data.adapter, echo) \
            if (cfg.eval.margin_accuracy or cfg.eval.generate) else None
    tokenizer = load_tokenizer(student, trust_remote_code=m.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with echo.stage("tokenize"):
        tok_train = tokenize_preferences(train_res.examples, tokenizer, cfg.tokenize, progress=progress)
        echo(f"  tokenized train: {tok_train.summary()}")
        tok_test = tokenize_preferences(test_res.examples, tokenizer, cfg.tokenize, progress=progress) \
            if test_res is not None else None
    ref_source = ModelSource.from_path(reference, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    teacher_source = ModelSource.from_path(teacher, dtype=cfg.cache.dtype or m.dtype,
                                           trust_remote_code=m.trust_remote_code) if teacher else None
    vocab = teacher_vocab_size(teacher, student, tokenizer, trust_remote_code=m.trust_remote_code) \
        if teacher else None

    with echo.stage("caches"):
        cache = CacheOptions(batch_size=cfg.cache.batch_size,
                             also=tuple(aux_specs(cfg.cache.precompute, cfg.cache.value_temperatures,
                                                  cfg.cache.q_sources)))
        ts = assemble_training_set(tok_train, loss, loss_cfg, reference=ref_source, teacher=teacher_source,
                                   pad_id=pad_id, teacher_vocab=vocab, cache=cache, subsample=cfg.data.subsample,
                                   seed=cfg.seed, progress=progress, say=echo)
    if "teacher" in ts.caches:
        metrics["cache_bytes_per_token"] = ts.caches["teacher"].stats["bytes_per_token"]
    settings = loss.eval_settings(loss_cfg)
    if settings.offset_column:
        metas = [json.loads(x) for x in ts.full["meta"]] if "meta" in ts.full.column_names else None
        metrics.update(teacher_signal(ts.full[settings.offset_column], metas))

    with echo.stage("train"):
        policy, train_metrics = train_policy(student, ts.train, loss, loss_cfg, cfg=cfg, out_dir=run_dir / "trainer",
                                             pad_id=pad_id, progress=progress)
        metrics.update(train_metrics)
        if cfg.train.save_model:
            policy.save_pretrained(str(run_dir / "checkpoint"))
            tokenizer.save_pretrained(str(run_dir / "checkpoint"))

    with echo.stage("evaluate"):
        ctx = EvalContext(cfg=cfg, policy=policy, tokenizer=tokenizer, pad_id=pad_id, settings=settings,
                          train=tok_train, test=tok_test, test_examples=test_res.examples if test_res else None,
                          reference=ref_source, teacher=teacher_source, teacher_vocab=vocab,
                          teacher_signal=needs.teacher, testbed=uses_testbed(cfg), progress=progress)
        metrics.update(run_evaluators(ctx, say=echo))
    metrics["seconds"] = dict(echo.timings)
    metrics["loss_config"] = asdict(loss_cfg)
    return metrics, ctx.outputs
