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


def _prompt_text(prompt_messages: list[dict]) -> str:
    return prompt_messages[-1]["content"]


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


def _teacher_scores(cfg: RunConfig, loss_cfg: Any, tok_test: Any, teacher_model: Any, teacher_key: str,
                    layout: dict[str, Any], pad_id: int, progress: bool) -> dict[str, float]:
    """Table 3 on the test pairs: does the teacher's Σ log π_T, mean log π_T or shaping sum Ψ rank pairs right?"""
    from tvkd.cache.teacher import build_teacher_cache, expand_teacher_columns
    from tvkd.evaluation.metrics import oracle_margin_accuracy, teacher_scores
    from tvkd.losses.base import AuxSpec
    from tvkd.shaping import shaping_sum_rows

    aux_spec = getattr(loss_cfg, "spec", None) or AuxSpec("soft_value", temperature=2.0)
    lp_spec = AuxSpec("log_prob")
    specs = [AuxSpec(**s) for s in layout["specs"]]
    specs = list(dict.fromkeys(specs + [aux_spec, lp_spec]))
    tc = build_teacher_cache(tok_test.dataset, tok_test.fingerprint, teacher_model, teacher_key, specs,
                             pad_id=pad_id, batch_size=cfg.cache.batch_size, progress=False)
    import datasets as hfds

    ds = expand_teacher_columns(hfds.concatenate_datasets([tok_test.dataset, tc.dataset], axis=1), tc.layout,
                                [aux_spec, lp_spec])
    from tvkd.aux_rewards import aux_kind

    kind = aux_kind(aux_spec.name)
    opts = {} if kind == "action" else dict(gamma=getattr(loss_cfg, "gamma", 1.0),
                                            shaping=getattr(loss_cfg, "shaping", "pbrs"),
                                            terminal=getattr(loss_cfg, "terminal", "teacher"))
    lw = np.array([sum(x) for x in ds["chosen/log_prob"]])
    ll = np.array([sum(x) for x in ds["rejected/log_prob"]])
    nw = np.array([len(x) for x in ds["chosen_ids"]], dtype=float)
    nl = np.array([len(x) for x in ds["rejected_ids"]], dtype=float)
    pw = np.array(shaping_sum_rows(ds[f"chosen/{aux_spec.column}"], kind, **opts))
    pl = np.array(shaping_sum_rows(ds[f"rejected/{aux_spec.column}"], kind, **opts))
    out = {f"teacher_scores/{k}": v for k, v in teacher_scores((lw, ll), (nw, nl), (pw, pl)).items()}
    metas = [json.loads(x) for x in ds["meta"]]
    if metas and all("oracle_chosen" in mm and "oracle_rejected" in mm for mm in metas):
        ow, ol = [mm["oracle_chosen"] for mm in metas], [mm["oracle_rejected"] for mm in metas]
        for name, (a, b) in {"sum_logprob": (lw, ll), "mean_logprob": (lw / nw, ll / nl), "shaping": (pw, pl)}.items():
            out[f"teacher_scores/oracle_{name}"] = oracle_margin_accuracy(a, b, ow, ol)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson's r of average ranks (pandas' own method needs scipy)."""
    import pandas as pd

    if len(a) < 3:
        return float("nan")
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def teacher_signal(train: Any) -> dict[str, float]:
    """How the per-pair teacher offset Ψ_w − Ψ_l relates to the labels, when the loss made one.

    `label_agreement`: fraction of pairs with Ψ_w > Ψ_l (the teacher ranks the labelled-chosen
    response higher; ties 1/2); `oracle_agreement`: the same against the oracle's true preference
    where the data carries oracle scores (the testbed), pairs the oracle ties left out. Both depend
    only on which offsets are positive, so a permutation of the offsets (the shuffled control)
    leaves them nearly unchanged; `oracle_gap_correlation` (Spearman ρ between the offset and the
    oracle gap r*(y_w) − r*(y_l)) is pair-specific and falls to ~0 under the shuffle.
    """
    from tvkd.evaluation.metrics import oracle_margin_accuracy, pairwise_accuracy

    if "tvkd_offset" not in train.column_names:
        return {}
    off = np.asarray(train["tvkd_offset"], dtype=np.float64)
    out = {
        "teacher_signal/label_agreement": pairwise_accuracy(off, np.zeros_like(off)),
        "teacher_signal/abs_mean": float(np.abs(off).mean()),
    }
    if "meta" in train.column_names:
        metas = [json.loads(x) for x in train["meta"]]
        if metas and all("oracle_chosen" in m and "oracle_rejected" in m for m in metas):
            ow = np.array([m["oracle_chosen"] for m in metas], dtype=np.float64)
            ol = np.array([m["oracle_rejected"] for m in metas], dtype=np.float64)
            out["teacher_signal/oracle_agreement"] = oracle_margin_accuracy(off, np.zeros_like(off), ow, ol)
            out["teacher_signal/oracle_gap_correlation"] = spearman(off, ow - ol)
    return out


def _load_pairs(source: str, split: str, limit: int | None, adapter: str | None, echo: Echo) -> Any:
    from tvkd.data import load_preferences

    res = load_preferences(source, split=split, adapter=adapter, limit=limit)
    echo(f"  data {source} [{split}]: {res.summary()}")
    if not res.examples:
        raise ValueError(f"{source} [{split}] has no usable preference pairs ({res.summary()})")
    return res


def _train_and_evaluate(cfg: RunConfig, run_dir: Path, echo: Echo, progress: bool,
                        testbed: dict[str, Any] | None) -> tuple[dict[str, Any], list | None]:
    import datasets
    from transformers import TrainingArguments

    from tvkd.cache.teacher import (
        build_reference_cache,
        build_teacher_cache,
        default_specs,
        expand_teacher_columns,
    )
    from tvkd.evaluation.metrics import (
        implicit_rewards,
        oracle_margin_accuracy,
        pairwise_accuracy,
        sequence_logps,
    )
    from tvkd.modeling import load_causal_lm, load_tokenizer, model_digest, resolve_device, shared_vocab_size
    from tvkd.tokenize import tokenize_preferences
    from tvkd.training.trainer import PreferenceCollator, PreferenceTrainer, training_columns

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
    loss_cls = LOSSES.get(cfg.loss.name)
    loss = loss_cls()
    loss_cfg = build_config(loss_cls, cfg.loss.options)
    needs = loss.needs(loss_cfg)
    device = resolve_device("auto")
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
    parts = [tok_train.dataset]
    ref_model = None

    def reference_model():
        nonlocal ref_model
        if ref_model is None:
            ref_model = load_causal_lm(reference, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
        return ref_model

    # A cache is keyed by the weights AND the forward dtype: bf16 and fp32 logits differ.
    ref_key = f"{model_digest(reference)}:{m.dtype}"
    teacher_key = f"{model_digest(teacher)}:{cfg.cache.dtype or m.dtype}" if teacher else None
    with echo.stage("reference_cache"):
        if needs.reference:
            rc = build_reference_cache(tok_train.dataset, tok_train.fingerprint, reference_model, ref_key,
                                       pad_id=pad_id, progress=progress)
            parts.append(rc.dataset)
            echo(f"  reference cache ({'cached' if rc.cached else 'built'}): {rc.path}")
    layout = None
    holder: dict[str, Any] = {}

    def teacher_model():
        if "m" not in holder:
            holder["m"] = load_causal_lm(teacher, dtype=cfg.cache.dtype or m.dtype,
                                         trust_remote_code=m.trust_remote_code)
        return holder["m"]

    with echo.stage("teacher_cache"):
        if needs.aux or needs.topk:
            if teacher is None:
                raise ValueError(f"loss {cfg.loss.name!r} needs a teacher: set models.teacher")
            specs = list(dict.fromkeys(default_specs(cfg.cache.value_temperatures, cfg.cache.q_sources) + list(needs.aux)))
            t_tok = load_tokenizer(teacher, trust_remote_code=m.trust_remote_code)
            from transformers import AutoConfig

            vt = AutoConfig.from_pretrained(teacher).vocab_size
            vs = AutoConfig.from_pretrained(student).vocab_size
            vocab = shared_vocab_size(t_tok, tokenizer, vt, vs)
            tc = build_teacher_cache(tok_train.dataset, tok_train.fingerprint, teacher_model, teacher_key,
                                     specs, topk=needs.topk, vocab_size=vocab if vocab != vt else None,
                                     pad_id=pad_id, batch_size=cfg.cache.batch_size, progress=progress)
            echo(f"  teacher cache ({'cached' if tc.cached else 'built'}): {tc.stats['bytes_per_token']:.1f} "
                 f"bytes per response token, {tc.path}")
            metrics["cache_bytes_per_token"] = tc.stats["bytes_per_token"]
            parts.append(tc.dataset)
            layout = tc.layout
            holder.clear()  # free the teacher while the student trains
    train = datasets.concatenate_datasets(parts, axis=1) if len(parts) > 1 else parts[0]
    train = train.add_column("pair_index", list(range(len(train))))
    if cfg.data.subsample:
        rng = np.random.default_rng(cfg.seed)
        k = max(1, int(round(cfg.data.subsample * len(train))))
        train = train.select(sorted(rng.choice(len(train), size=k, replace=False).tolist()))
        train = train.remove_columns("pair_index").add_column("pair_index", list(range(len(train))))
        echo(f"  subsample: {k} of {len(tok_train.dataset)} pairs (seed {cfg.seed})")
    if layout is not None and needs.aux:
        train = expand_teacher_columns(train, layout, needs.aux)
    train = loss.prepare(train, loss_cfg, seed=cfg.seed)
    metrics.update(teacher_signal(train))
    train = training_columns(train, loss.batch_columns(loss_cfg), needs.reference)

    # --- train -------------------------------------------------------------------------------
    with echo.stage("train"):
        policy = load_causal_lm(student, dtype=m.dtype, trust_remote_code=m.trust_remote_code, eval_mode=False)
        t = cfg.train
        out_dir = run_dir / "trainer"
        args = TrainingArguments(
            output_dir=str(out_dir), seed=cfg.seed, data_seed=cfg.seed, learning_rate=t.learning_rate,
            num_train_epochs=t.num_train_epochs, per_device_train_batch_size=t.per_device_train_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
            warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
            logging_steps=t.logging_steps, save_strategy=t.save_strategy, save_steps=t.save_steps,
            report_to=list(t.report_to) or "none", remove_unused_columns=False, use_cpu=device.type == "cpu",
            bf16=device.type == "cuda" and m.dtype in ("auto", "bf16", "bfloat16") and torch.cuda.is_bf16_supported(),
            disable_tqdm=not progress, dataloader_num_workers=0, **t.extra,
        )
        collator = PreferenceCollator(pad_id=pad_id, batch_columns=loss.batch_columns(loss_cfg),
                                      reference=needs.reference)
        trainer = PreferenceTrainer(model=policy, args=args, train_dataset=train, data_collator=collator,
                                    loss=loss, loss_config=loss_cfg, needs_student_logits=needs.student_logits)
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        resume = t.save_strategy != "no" and any(out_dir.glob("checkpoint-*"))
        result = trainer.train(resume_from_checkpoint=True if resume else None)
        metrics["train_loss"] = float(result.training_loss)
        metrics["train_steps"] = int(result.global_step)
        metrics["train_pairs"] = len(train)
        metrics["train_seconds"] = float(result.metrics.get("train_runtime", 0.0))
        logged = [h for h in trainer.state.log_history if "loss" in h]
        if logged:
            metrics["train_log_last"] = {k: v for k, v in logged[-1].items() if isinstance(v, (int, float))}
        if t.save_model:
            trainer.save_model(str(run_dir / "checkpoint"))
        if not t.save_strategy == "no":
            pass  # checkpoints stay in trainer/ for resume
    policy.eval()

    # --- evaluate ----------------------------------------------------------------------------
    outputs = None
    with echo.stage("evaluate"):
        if tok_test is not None and cfg.eval.margin_accuracy:
            test_ref_c = build_reference_cache(tok_test.dataset, tok_test.fingerprint, reference_model, ref_key,
                                               pad_id=pad_id, progress=False)
            ref = (np.array([sum(x) for x in test_ref_c.dataset["chosen/ref_logps"]], dtype=np.float64),
                   np.array([sum(x) for x in test_ref_c.dataset["rejected/ref_logps"]], dtype=np.float64))
            pol = sequence_logps(policy, tok_test.dataset, pad_id=pad_id, batch_size=cfg.eval.batch_size)
            beta = float(getattr(loss_cfg, "beta", 1.0) or 1.0)
            s_w, s_l = implicit_rewards(pol, ref, beta)
            metrics["margin_accuracy"] = pairwise_accuracy(s_w, s_l, cfg.eval.ties)
            metrics["implicit_reward_margin"] = float(np.mean(s_w - s_l))
            metas = [json.loads(x) for x in tok_test.dataset["meta"]]
            if metas and all("oracle_chosen" in mm and "oracle_rejected" in mm for mm in metas):
                metrics["oracle_margin_accuracy"] = oracle_margin_accuracy(
                    s_w, s_l, [mm["oracle_chosen"] for mm in metas], [mm["oracle_rejected"] for mm in metas],
                    cfg.eval.ties)
        if cfg.eval.generate and test_res is not None:
            from tvkd.generation import generate

            seen, prompts = set(), []
            for ex in test_res.examples:
                k = json.dumps(ex.prompt, sort_keys=True)
                if k not in seen:
                    seen.add(k)
                    prompts.append(ex.prompt)
            texts = generate(policy, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                             batch_size=cfg.eval.batch_size, progress=progress)
            outputs = [{"prompt": _prompt_text(p), "response": r[0]} for p, r in zip(prompts, texts)]
            if uses_testbed(cfg):
                from tvkd.testbed import exact_match, has_flaw, score

                for o in outputs:
                    o["oracle"] = score(o["prompt"], o["response"])
                metrics["oracle_score"] = float(np.mean([o["oracle"] for o in outputs]))
                metrics["exact_match"] = float(np.mean([exact_match(o["prompt"], o["response"]) for o in outputs]))
                metrics["flaw_rate"] = float(np.mean([has_flaw(o["prompt"], o["response"]) for o in outputs]))
            metrics["response_words"] = float(np.mean([len(o["response"].split()) for o in outputs]))
            metrics["eval_prompts"] = len(outputs)
        if cfg.eval.teacher_scores and teacher is not None and tok_test is not None and layout is not None:
            metrics.update(_teacher_scores(cfg, loss_cfg, tok_test, teacher_model, teacher_key, layout,
                                           pad_id, progress))
        if cfg.eval.value_alignment and teacher is not None:
            from tvkd.evaluation.metrics import value_alignment

            tm = load_causal_lm(teacher, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
            sub = tok_train.dataset.select(range(min(cfg.eval.value_alignment, len(tok_train.dataset))))
            bv = float(getattr(loss_cfg, "value_temperature", 2.0) or 2.0)
            metrics.update(value_alignment(tm, policy, sub, beta_v=bv, pad_id=pad_id))
    metrics["seconds"] = dict(echo.timings)
    metrics["loss_config"] = asdict(loss_cfg)
    return metrics, outputs
