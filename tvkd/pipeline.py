"""One run, end to end: check inputs -> caches -> train -> evaluate -> results store.

    plan_run      every input checked (config, loss options, models, vocabularies, data) and the
                  run's identity computed: the config plus the content of what it reads
    execute       a finished run is returned as is; otherwise the store's run folder is started,
                  the training set assembled (`tvkd.assemble`), the student trained (resuming from
                  a checkpoint of a killed attempt) and evaluated (`tvkd.evaluation`)

Every stage is keyed by a content hash of its inputs (tokenized data, caches, the run itself),
so a rerun skips what is done, and a changed input is a new run.

Started by a multi-process launcher (``accelerate launch --multi_gpu --num_processes N -m tvkd run``
or ``torchrun``), one run is split over the processes (DDP); see `tvkd.distributed`: the main
process alone writes the run folder, builds the caches first and evaluates.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvkd.api import Needs
from tvkd.config import RunConfig
from tvkd.distributed import launched_world_size
from tvkd.losses import LOSSES, build_config
from tvkd.paths import content_digest, fingerprint

log = logging.getLogger(__name__)

TESTBED_PREFIX = "testbed:"
TESTBED_PARTS = {
    "student_sft": "student_sft_dir", "teacher_sft": "teacher_sft_dir", "teacher_dpo": "teacher_dpo_dir",
    "student_dpo": "student_dpo_dir", "teacher_dpo_other_vocab": "teacher_dpo_other_vocab_dir",
    "tokenizer": "tokenizer_dir", "pref_train": "pref_train",
    "pref_test": "pref_test", "student_pref_train": "student_pref_train", "student_pref_test": "student_pref_test",
    "student_pref_train_oracle": "student_pref_train_oracle", "sft_train": "sft_train", "test_prompts": "test_prompts",
}


class Echo:
    """Prints one line per stage; records its wall time and peak memory (`tvkd.memory.peak_memory`)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self.peaks: dict[str, dict[str, Any]] = {}

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    @contextmanager
    def stage(self, name: str):
        from tvkd.memory import peak_memory

        t0 = time.perf_counter()
        with peak_memory() as peak:
            yield
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.peaks[name] = peak


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


MODEL_ROLES = ("student", "reference", "teacher", "teacher_reference")


@dataclass
class RunPlan:
    """A run with every input resolved and checked, and its identity: nothing of it is in the store yet."""

    cfg: RunConfig
    loss: Any  # PreferenceLoss
    loss_cfg: Any
    paths: dict[str, str | None]  # role -> local path or hub id (testbed parts resolved)
    inputs: dict[str, str]  # role -> content fingerprint (`paths.content_digest`)
    key: dict[str, Any]  # the run's identity in the results store: the config and its inputs' content
    testbed: dict[str, Any] | None = None
    tokenizer: Any = None
    pad_id: int = 0
    eos_id: int | None = None
    teacher_vocab: int | None = None
    teacher_tokens: Any = None  # cross_tokenizer.TeacherTokens: a teacher whose tokenizer differs from the student's
    train_data: Any = None  # LoadResult
    test_data: Any = None  # LoadResult | None
    tokenized_train: Any = None  # TokenizedData
    tokenized_test: Any = None
    validation: list | None = None  # the held-out validation pairs (data.validation_fraction), never trained on


def _check_model(role: str, value: str, trust_remote_code: bool, strict_weights: bool = True) -> Path:
    """The local folder of a model, with its config and safetensors weights readable and matching its
    architecture (no weight missing, none unexpected: `modeling.check_model_weights`), or a clear error."""
    from tvkd.modeling import check_model_folder, check_model_weights, local_model_path

    path = local_model_path(value)
    if path is None:
        raise InputError(f"models.{role}: {value!r} is neither a local folder nor a model in the local Hugging "
                         "Face cache (this harness runs offline); download it where there is network access "
                         f"(huggingface-cli download {value}) or give a local folder")
    check_model_folder(path, f"models.{role}")
    check_model_weights(path, f"models.{role}", trust_remote_code=trust_remote_code, strict=strict_weights)
    return path


def _data_fingerprint(value: str) -> str:
    path = Path(value)
    if path.exists():
        return content_digest(path)
    try:
        from huggingface_hub import snapshot_download

        return content_digest(snapshot_download(value, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: loading it says so, with the fix
        return f"hub:{value}"


def run_identity(cfg: RunConfig, paths: dict[str, str | None], testbed: dict[str, Any] | None = None
                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """(store key, input fingerprints): the config plus the content of every model and data file it reads.

    A data file or model folder changed in place is a new run; an unchanged one is the same run.
    """
    from tvkd.modeling import model_digest

    inputs: dict[str, str] = {}
    for role in MODEL_ROLES:
        if paths.get(role):
            inputs[f"models.{role}"] = model_digest(paths[role])
    for role in ("source", "test_source"):
        if paths.get(role):
            inputs[f"data.{role}"] = _data_fingerprint(paths[role])
    key = {**cfg.to_dict(), "inputs": inputs}
    implied = _implied_loss_defaults(cfg)
    if implied:
        key["loss_defaults"] = implied
    # Identity by content: a local model folder or data file is in the key by its fingerprint (`inputs`);
    # its path stays in the record (config.yaml) but not in the hash (`results._content_keyed`), so a copy of
    # the same files at another path is the same run.
    if testbed:
        key["testbed"] = testbed
    processes = launched_world_size()
    if processes > 1:  # per_device_train_batch_size is per process: N processes train on N x the batch
        key["processes"] = processes
    return key, inputs


def _implied_loss_defaults(cfg: RunConfig) -> dict[str, Any]:
    """The loss's `identity_defaults` that the config leaves out, with the values they resolve to."""
    from tvkd.api import LOSSES, build_config

    cls = LOSSES.get(cfg.loss.name)
    left_out = [k for k in getattr(cls, "identity_defaults", ()) if k not in cfg.loss.options]
    if not left_out:
        return {}
    resolved = build_config(cls, cfg.loss.options)
    return {k: getattr(resolved, k) for k in left_out}


def identity(cfg: RunConfig, testbed: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """The store key of a run (`run_identity`) without checking or loading its inputs (study planning)."""
    testbed = testbed if testbed is not None else (dict(cfg.testbed) or None)
    m = cfg.models
    paths = {"student": resolve(m.student, testbed, progress), "teacher": resolve(m.teacher, testbed, progress),
             "teacher_reference": resolve(m.teacher_reference, testbed, progress),
             "source": resolve(cfg.data.source, testbed, progress)}
    paths["reference"] = resolve(m.reference, testbed, progress) or paths["student"]
    paths["test_source"] = resolve(cfg.data.test_source, testbed, progress) or paths["source"]
    return run_identity(cfg, paths, testbed)[0]


class InputError(ValueError):
    """An input (model, data, vocabulary) that cannot be used; the message names it and the fix."""


def plan_run(cfg: RunConfig, *, testbed: dict[str, Any] | None = None, progress: bool = True,
             echo: Echo | None = None) -> RunPlan:
    """Check every input of a run before any model loads or any cache is built, and compute its identity.

    Config keys, types and ranges were checked when the config was built; here: the loss's
    options, the testbed parts (built if needed), every model folder (config and safetensors
    weights readable), the reference's and the teacher's vocabulary against the student's, the
    data (loaded and tokenized: a malformed row is named here), and the content fingerprints.
    """
    echo = echo or Echo(progress)
    testbed = testbed if testbed is not None else (dict(cfg.testbed) or None)
    loss = LOSSES.get(cfg.loss.name)()
    loss_cfg = build_config(type(loss), cfg.loss.options)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    m = cfg.models
    needs = loss.needs(loss_cfg) if not cfg.eval_only else Needs()
    if needs.teacher and not m.teacher:
        raise InputError(f"loss {cfg.loss.name!r} needs a teacher: set models.teacher (a folder, hub id or "
                         "testbed:teacher_dpo)")
    if needs.teacher_reference and not m.teacher_reference:
        raise InputError(f"loss {cfg.loss.name!r} needs the teacher's SFT model: set models.teacher_reference "
                         "(a folder, hub id or testbed:teacher_sft)")
    # the config alone is answered above; what follows reads files and models (transformers, datasets)
    from tvkd.cross_tokenizer import CrossTokenizerError, template_label, token_level_reason
    from tvkd.modeling import (
        VocabularyMismatchError,
        load_tokenizer,
        reference_vocab_check,
        teacher_vocab_size,
    )

    if not progress:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    paths: dict[str, str | None] = {
        "student": resolve(m.student, testbed, progress),
        "teacher": resolve(m.teacher, testbed, progress),
        "teacher_reference": resolve(m.teacher_reference, testbed, progress),
        "source": resolve(cfg.data.source, testbed, progress),
    }
    paths["reference"] = resolve(m.reference, testbed, progress) or paths["student"]
    paths["test_source"] = resolve(cfg.data.test_source, testbed, progress) or paths["source"]
    for role in MODEL_ROLES:
        if paths[role]:
            paths[role] = str(_check_model(role, paths[role], m.trust_remote_code, m.strict_weights))
    if not cfg.eval_only:
        from tvkd.training.trainer import check_arguments

        check_arguments(cfg)  # transformers' own checks of every train value, before the run folder exists
    tokenizer = load_tokenizer(paths["student"], trust_remote_code=m.trust_remote_code)
    reference_vocab_check(paths["reference"], paths["student"], tokenizer, trust_remote_code=m.trust_remote_code)
    vocab, teacher_tok = None, None
    if paths["teacher"]:
        try:
            vocab = teacher_vocab_size(paths["teacher"], paths["student"], tokenizer,
                                       trust_remote_code=m.trust_remote_code)
        except VocabularyMismatchError as e:
            # A teacher of another tokenizer: fine for what reads only sequence-level teacher values, and for
            # a loss that never reads the teacher (its token-level evaluators are skipped, saying why).
            teacher_tok = load_tokenizer(paths["teacher"], trust_remote_code=m.trust_remote_code)
            reason = token_level_reason(cfg.loss.name, loss_cfg, needs)
            if reason:
                raise InputError(f"models.teacher: its tokenizer differs from the student's ({len(teacher_tok)} vs "
                                 f"{len(tokenizer)} tokens), and loss {cfg.loss.name!r} {reason}; that needs one "
                                 "vocabulary: pick a teacher of the student's family, or a loss that reads only "
                                 "sequence-level teacher values (tvkd with a state aux, gamma 1, shaping pbrs)") from e
    if paths["teacher_reference"] and needs.teacher_reference:
        tref_vocab = teacher_vocab_size(paths["teacher_reference"], paths["student"], tokenizer,
                                        trust_remote_code=m.trust_remote_code)
        if paths["teacher"] and tref_vocab != vocab:
            raise InputError("models.teacher_reference: its vocabulary rows differ from the teacher's; the teacher "
                             "and its SFT model must share one embedding matrix shape")
    k = max(needs.topk or 0, needs.teacher_reference_topk or 0)
    if k:
        from transformers import AutoConfig

        rows = vocab or AutoConfig.from_pretrained(paths["teacher"], trust_remote_code=m.trust_remote_code).vocab_size
        if k >= rows:
            raise InputError(f"loss {cfg.loss.name!r}: top-k {k} must be smaller than the teacher's vocabulary "
                             f"({rows} tokens), or the rest bin is empty; set loss.topk below {rows}")
    from tvkd.distributed import is_main_process

    for role in ("teacher", "teacher_reference"):  # said once, by the main process of a multi-process launch
        if paths[role] and not cfg.tokenize.chat_template and is_main_process():
            _template_notice(role, paths[role], tokenizer, m.trust_remote_code)
    key, inputs = run_identity(cfg, paths, testbed)
    plan = RunPlan(cfg=cfg, loss=loss, loss_cfg=loss_cfg, paths=paths, inputs=inputs, key=key, testbed=testbed,
                   tokenizer=tokenizer, teacher_vocab=vocab)
    echo(f"  chat template: student: {template_label(tokenizer, cfg.tokenize.chat_template)}" + (
        "" if not paths["teacher"] else "; teacher: the student's (one tokenizer)" if teacher_tok is None
        else f"; teacher (another tokenizer): {template_label(teacher_tok)}"))
    plan.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan.eos_id = tokenizer.convert_tokens_to_ids(cfg.tokenize.eos_token or tokenizer.eos_token)
    if cfg.eval.checkpoints:
        _check_checkpoint_selection(cfg)
    plan.train_data = _load_pairs(paths["source"], cfg.data.split, cfg.data.limit, cfg.data.adapter, echo)
    if cfg.data.validation_fraction is not None:
        _hold_out_validation(plan, paths["source"], testbed=uses_testbed(cfg), echo=echo)
    from tvkd.evaluation import wanted_inputs

    if "test_pairs" in wanted_inputs(cfg.eval):  # any evaluator turned on that reads the held-out pairs
        plan.test_data = _load_pairs(paths["test_source"], cfg.data.test_split, cfg.data.test_limit,
                                     cfg.data.adapter, echo)
    for key in (loss.meta_keys(loss_cfg) if not cfg.eval_only else ()):
        _check_meta_key(plan.train_data.examples, key, paths["source"], cfg.loss.name)
    plan.tokenized_train = _tokenize(plan.train_data.examples, tokenizer, cfg, progress, "data.source",
                                     paths["source"], paths["student"])
    echo(f"  tokenized train: {plan.tokenized_train.summary()}")
    if plan.test_data is not None:
        plan.tokenized_test = _tokenize(plan.test_data.examples, tokenizer, cfg, progress, "data.test_source",
                                        paths["test_source"], paths["student"])
    if teacher_tok is not None:
        try:
            plan.teacher_tokens = _teacher_tokens(plan, teacher_tok, needs, progress)
        except CrossTokenizerError as e:
            raise InputError(f"models.teacher (another tokenizer): {e}") from None
        if plan.teacher_tokens.train is not None:
            echo(f"  tokenized train for the teacher: {plan.teacher_tokens.train.summary()}")
    return plan


def _hold_out_validation(plan: RunPlan, source: str, *, testbed: bool, echo: Echo) -> None:
    """Take the validation pairs (`tvkd.data.holdout`) out of the training pairs, checking that both sides keep
    pairs and that what scores val/rm_score can be loaded, before any model loads."""
    import dataclasses

    from tvkd.data.holdout import split_validation
    from tvkd.evaluation.validation import ORACLE, validation_reward_model

    cfg = plan.cfg
    fraction = cfg.data.validation_fraction
    pairs = plan.train_data.examples
    train, validation = split_validation(pairs, fraction)
    if not validation or not train:
        side, fix = ("no validation pair", "raise it") if not validation else ("no training pair", "lower it")
        raise InputError(f"data.validation_fraction: {fraction} of the {len(pairs)} pairs of {source} leaves {side} "
                         f"(the held-out prompts are chosen by their content hash); {fix}, or train on more pairs "
                         "(data.limit)")
    prompts = len({p for p in map(_prompt_key, validation)})
    echo(f"  validation: {len(validation)} pairs ({prompts} prompts) of {len(pairs)} held out "
         f"(data.validation_fraction {fraction}); {len(train)} left to train on")
    plan.train_data = dataclasses.replace(plan.train_data, examples=train)
    plan.validation = validation
    name = validation_reward_model(cfg, testbed)
    if name == ORACLE and not testbed:
        raise InputError("eval.validation_reward_model: 'oracle' needs a testbed run (the oracle r* only exists on "
                         "testbed data); give a reward model (hub id or folder), or null")
    if name is not None and name != ORACLE:
        from tvkd.modeling import local_model_path

        if local_model_path(name) is None:
            raise InputError(f"eval.validation_reward_model: {name!r} is neither a local folder nor a model in the "
                             "local Hugging Face cache (this harness runs offline); download it where there is "
                             f"network access (hf download {name}) or give a local folder")


def _check_checkpoint_selection(cfg: RunConfig) -> None:
    """``eval.checkpoints`` picks by a metric the run can compute, in one process (the config itself checked that
    it has a validation split, trains, and keeps no resumable checkpoints)."""
    if cfg.eval.checkpoint_metric == "oracle_score" and not uses_testbed(cfg):
        raise InputError("eval.checkpoint_metric: oracle_score exists on testbed runs only; pick by rm_score "
                         "(with eval.validation_reward_model)")
    if cfg.eval.checkpoint_metric == "rm_score" and not uses_testbed(cfg) and not cfg.eval.validation_reward_model:
        raise InputError("eval.checkpoint_metric: rm_score needs a reward model off the testbed; set "
                         "eval.validation_reward_model (a hub id or folder)")
    if launched_world_size() > 1:
        raise InputError("eval.checkpoints: not available under a multi-process launch yet (the validation "
                         "evaluation runs in one process); run it in one process, or drop eval.checkpoints")


def _prompt_key(example: Any) -> str:
    from tvkd.data.holdout import prompt_key

    return prompt_key(example.prompt)


def _validate(plan: RunPlan, policy: Any, echo: Echo, progress: bool, ctx: Any) -> dict[str, Any]:
    """The val/ metrics of the trained policy (`tvkd.evaluation.validation`); its rows go to validation.jsonl."""
    if not plan.validation:
        return {}
    from tvkd.evaluation.validation import evaluate_validation

    metrics, rows = evaluate_validation(policy, plan.tokenizer, plan.validation, plan.cfg,
                                        testbed=uses_testbed(plan.cfg), progress=progress, say=echo)
    ctx.items["validation"] = rows
    return metrics


def _teacher_tokens(plan: RunPlan, teacher_tok: Any, needs: Any, progress: bool) -> Any:
    """The pairs in the teacher's own tokenization, where something reads its sequence-level values."""
    from tvkd.cross_tokenizer import TeacherTokens, template_label, tokenize_for_teacher
    from tvkd.evaluation import enabled

    cfg = plan.cfg
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id
    train = test = None
    if needs.aux:
        train = tokenize_for_teacher(plan.train_data.examples, teacher_tok, cfg.tokenize, plan.tokenized_train,
                                     where="data.source", progress=progress)
    if needs.teacher and plan.tokenized_test is not None and enabled(cfg.eval, "teacher_scores"):
        test = tokenize_for_teacher(plan.test_data.examples, teacher_tok, cfg.tokenize, plan.tokenized_test,
                                    where="data.test_source", progress=progress)
    return TeacherTokens(tokenizer=teacher_tok, train=train, test=test, pad_id=pad, template=template_label(teacher_tok))


def _tokenize(examples: list, tokenizer: Any, cfg: RunConfig, progress: bool, key: str, source: str,
              model: str) -> Any:
    """`tokenize_preferences`, with a row the chat template refuses, or a set of which no pair fits the
    length limits, named as one error."""
    from tvkd.tokenize import NoPairFitsError, tokenize_preferences

    try:
        return tokenize_preferences(examples, tokenizer, cfg.tokenize, progress=progress)
    except NoPairFitsError as e:
        raise InputError(f"{key}: {source}: {e}") from None
    except Exception as e:  # noqa: BLE001 - find the row a template error (or any rendering error) comes from
        problem = _template_problem(examples, tokenizer, cfg, e)
        if problem is None:
            raise
        where = "tokenize.chat_template" if cfg.tokenize.chat_template else f"the chat template of {model}"
        if problem.startswith("the chat template does not compile"):
            raise InputError(f"{where}: {problem}; fix it, or set tokenize.chat_template to one that compiles"
                             ) from None
        raise InputError(f"{key}: {source}: {problem}; {where} cannot render it. Fix or drop the row, or set "
                         "tokenize.chat_template to a template that accepts it") from None


def _template_problem(examples: list, tokenizer: Any, cfg: RunConfig, error: BaseException) -> str | None:
    """Which row a tokenization error comes from and the template's own message, or None when it is not
    a rendering error of a row (then the error is not the data's)."""
    from collections import Counter

    from jinja2 import TemplateError, TemplateSyntaxError

    from tvkd.tokenize import tokenize_example

    def said(e: BaseException) -> str:
        at = f" (template line {e.lineno})" if isinstance(e, TemplateSyntaxError) and e.lineno else ""
        return f"{type(e).__name__}{at}: {' '.join(str(e).split())[:300]}"

    if isinstance(error, TemplateSyntaxError):  # the template itself, whatever the row
        return f"the chat template does not compile: {said(error)}"
    eos_id = tokenizer.convert_tokens_to_ids(cfg.tokenize.eos_token or tokenizer.eos_token)
    for i, ex in enumerate(examples):
        try:
            tokenize_example(ex, tokenizer, eos_id, Counter())
        except (TemplateError, TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
            roles = [m.get("role") for m in [*ex.prompt, *ex.chosen]] if isinstance(ex.prompt, list) else None
            return f"row {i} (id {ex.id!r}{f', roles {roles}' if roles else ''}): {said(e)}"
    return None


def _template_notice(role: str, path: str, student_tokenizer: Any, trust_remote_code: bool) -> None:
    """Say (stderr, one line) when a teacher's chat template differs from the student's: the teacher then
    scores responses rendered in the student's format, not its own."""
    import sys

    from tvkd.modeling import load_tokenizer

    theirs = getattr(load_tokenizer(path, trust_remote_code=trust_remote_code), "chat_template", None)
    ours = getattr(student_tokenizer, "chat_template", None)
    if theirs != ours:
        what = "has no chat template" if not theirs else "has a chat template that differs from the student's"
        print(f"notice: models.{role} ({path}) {what}; its signal is computed on pairs rendered with the "
              "student's template", file=sys.stderr, flush=True)


def _check_meta_key(examples: list, key: str, source: str, loss: str) -> None:
    """Every training pair carries a number under `key` in its meta (a `data:` offset source), or a clear error."""
    for i, ex in enumerate(examples):
        value = (ex.meta or {}).get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problem = "has no such key" if value is None else f"holds {value!r}, not a number"
            keys = sorted(ex.meta or {})
            raise InputError(f"loss {loss!r} reads the column {key!r} of every pair (a data: offset), but row {i} "
                             f"(id {ex.id!r}) of {source} {problem}; its meta keys are {keys}")


@contextmanager
def _signals_interrupt():
    """SIGTERM raises `RunInterrupted` (as Ctrl-C raises KeyboardInterrupt), so the run is marked interrupted."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise RunInterrupted(f"received signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGTERM); like Ctrl-C, it is recorded as interrupted."""


def execute(cfg: RunConfig, *, store: Any = None, force: bool = False, progress: bool = True,
            echo: Echo | None = None, testbed: dict[str, Any] | None = None, callbacks: list | None = None) -> Any:
    """Train and evaluate one configuration, or return its stored record if it already finished.

    Every input is checked first (`plan_run`): a mistake costs no store entry. A run killed after
    a checkpoint (``train.save_strategy: steps``) resumes from it; `force` redoes a finished run.
    `callbacks`: extra `transformers.TrainerCallback`s for the training (e.g. a search's pruning hook).

    In a multi-process launch every process calls this with the same arguments (`tvkd.distributed`):
    the main process plans first, decides (complete / start / resume), writes the run folder, builds
    the caches first and evaluates; the others train their share and return the finished record
    once the main process is done (or raise its error).
    """
    from tvkd.distributed import setup
    from tvkd.results import ResultsStore

    dist = setup(ddp_timeout_s=(cfg.train.extra or {}).get("ddp_timeout"))
    if not dist.is_main:
        progress, echo = False, Echo(False)
    echo = echo or Echo(progress)
    store = store or ResultsStore()
    with dist.main_first("plan"), dist.alone():  # the main process builds a testbed / tokenized data first
        plan = plan_run(cfg, testbed=testbed, progress=progress, echo=echo)
    resumable = cfg.train.save_strategy != "no" and not force
    handle = None

    def begin() -> dict[str, Any]:  # the main process only
        # lazy: transformers' Trainer (~8 s to import), not before the plan has answered
        from tvkd.training.trainer import last_checkpoint

        nonlocal handle
        if not force and store.is_complete(plan.key, study=cfg.study, name=cfg.name):
            return {"complete": True}
        handle = store.start(plan.key, study=cfg.study, name=cfg.name, overwrite=force, keep_checkpoint=resumable)
        resume = last_checkpoint(handle.run_dir / "checkpoint") if resumable else None
        return {"complete": False, "run_dir": str(handle.run_dir), "resume": str(resume) if resume else None}

    try:
        decision = dist.from_main(begin)
        if decision["complete"]:
            rec = store.load(plan.key, study=cfg.study, name=cfg.name)
            echo(f"[{cfg.name}] already complete: {rec.run_dir} (nothing to do; --force reruns it)")
            return rec
        run_dir = Path(decision["run_dir"])
        echo(f"[{cfg.name}] running in {run_dir}" + (f" ({dist.world_size} processes)" if dist.enabled else ""))
        with _signals_interrupt():
            # every process trains; then the main process evaluates and writes while the others wait for
            # it (a failure there reaches them as an exception; one in training ends their collectives)
            evaluate = _train(plan, run_dir, echo, progress, callbacks, dist=dist, resume=decision["resume"])

            done: dict[str, Any] = {}

            def finish() -> None:  # the main process only
                done["metrics"], outputs, items = evaluate()
                metrics = done["metrics"]
                if outputs is not None:
                    handle.write_outputs(outputs)
                for name, rows in items.items():
                    handle.write_outputs(rows, name=f"{name}.jsonl")
                handle.write_metrics(metrics)
                if not cfg.train.keep_checkpoints:
                    shutil.rmtree(handle.run_dir / "checkpoint", ignore_errors=True)
                handle.complete()

            dist.from_main(finish)  # the others wait here for the main process's evaluation
    except KeyboardInterrupt as e:
        if handle is not None:
            _record_end(handle, handle.interrupt, e)
        raise
    except BaseException as e:
        if handle is not None:
            _record_end(handle, handle.fail, e)
        raise
    dist.remove_scratch(run_dir)
    rec = store.load(plan.key, study=cfg.study, name=cfg.name)
    if dist.is_main:
        echo(f"[{cfg.name}] done in {sum(echo.timings.values()):.1f}s: " + ", ".join(
            f"{k}={v:.4f}" for k, v in done["metrics"].items() if k in ("margin_accuracy", "oracle_score", "val/oracle_score", "val/rm_score", "train_loss")
        ))
    return rec


def _record_end(handle: Any, mark: Any, error: BaseException) -> None:
    """Mark a run failed / interrupted; when even that write fails (a full disk), release the run and let
    the first error, which names what could not be written, be the one reported."""
    if handle.finished:
        return
    try:
        mark(error)
    except OSError:
        handle.abandon()


def _evaluate_only(plan: RunPlan, echo: Echo, progress: bool, ref_source: Any, teacher_source: Any
                   ) -> tuple[dict[str, Any], list | None, dict[str, list]]:
    """Evaluate models.student as it is (`eval_only`): the evaluators of a trained run, no caches, no training."""
    from tvkd.cross_tokenizer import run_evaluators_with
    from tvkd.evaluation import EvalContext
    from tvkd.modeling import load_causal_lm

    cfg = plan.cfg
    with echo.stage("evaluate"):
        policy = load_causal_lm(plan.paths["student"], dtype=cfg.models.dtype,
                                trust_remote_code=cfg.models.trust_remote_code)
        ctx = EvalContext(cfg=cfg, policy=policy, tokenizer=plan.tokenizer, pad_id=plan.pad_id,
                          settings=plan.loss.eval_settings(plan.loss_cfg), train=plan.tokenized_train,
                          test=plan.tokenized_test, test_examples=plan.test_data.examples if plan.test_data else None,
                          reference=ref_source, teacher=teacher_source, teacher_vocab=plan.teacher_vocab,
                          teacher_signal=False, testbed=uses_testbed(cfg), progress=progress)
        metrics = run_evaluators_with(ctx, plan.teacher_tokens, say=echo)
        metrics.update(_validate(plan, policy, echo, progress, ctx))
    metrics["seconds"] = dict(echo.timings)
    metrics["peak_memory_mb"] = dict(echo.peaks)
    metrics["tokenize"] = tokenize_counts(plan)
    metrics["eval_only"] = True
    return metrics, ctx.outputs, ctx.items


def tokenize_counts(plan: RunPlan) -> dict[str, Any]:
    """What the tokenization of the training pairs changed or kept (`tvkd.tokenize`), for metrics.json."""
    counts = plan.tokenized_train.counts
    out: dict[str, Any] = {"response_tail": plan.cfg.tokenize.response_tail}
    for key in ("template_tail_kept", "template_tail_dropped", "eos_missing", "eos_appended", "prompt_not_prefix"):
        out[key] = int(counts.get(key, 0))
    return out


def _load_pairs(source: str, split: str, limit: int | None, adapter: str | None, echo: Echo) -> Any:
    from tvkd.data import load_preferences

    res = load_preferences(source, split=split, adapter=adapter, limit=limit)
    echo(f"  data {source} [{split}]: {res.summary()}")
    if not res.examples:
        raise InputError(f"{source} [{split}] has no usable preference pairs ({res.summary()})")
    return res


def _train_and_evaluate(plan: RunPlan, run_dir: Path, echo: Echo, progress: bool, callbacks: list | None = None
                        ) -> tuple[dict[str, Any], list | None, dict[str, list]]:
    """caches and prepare (assemble) -> train -> evaluate; (metrics, generations, per-item results)."""
    return _train(plan, run_dir, echo, progress, callbacks)()


def _train(plan: RunPlan, run_dir: Path, echo: Echo, progress: bool, callbacks: list | None = None,
           dist: Any = None, resume: Any = "auto") -> Any:
    """caches and prepare (assemble) -> train; returns the evaluation step: () -> (metrics, generations, items).

    `dist` (`tvkd.distributed.Distributed`): in a multi-process run the main process builds the
    caches first, every process trains (DDP), and only the main process evaluates: the others
    get None. `resume`: the checkpoint to resume from, as `train_policy` takes it.
    """

    from tvkd.assemble import CacheOptions, assemble_training_set
    from tvkd.cache.teacher import aux_specs
    from tvkd.cross_tokenizer import run_evaluators_with
    from tvkd.distributed import current
    from tvkd.evaluation import EvalContext
    from tvkd.evaluation.metrics import teacher_signal
    from tvkd.modeling import ModelSource
    from tvkd.training.trainer import train_policy

    cfg, loss, loss_cfg = plan.cfg, plan.loss, plan.loss_cfg
    set_seed(cfg.seed)
    m = cfg.models
    metrics: dict[str, Any] = {}
    ref_source = ModelSource.from_path(plan.paths["reference"], dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    teacher_source = ModelSource.from_path(plan.paths["teacher"], dtype=cfg.cache.dtype or m.dtype,
                                           trust_remote_code=m.trust_remote_code) if plan.paths["teacher"] else None
    tref_source = ModelSource.from_path(plan.paths["teacher_reference"], dtype=cfg.cache.dtype or m.dtype,
                                        trust_remote_code=m.trust_remote_code) if plan.paths["teacher_reference"] else None

    dist = dist or current()
    if cfg.eval_only:
        return (lambda: _evaluate_only(plan, echo, progress, ref_source, teacher_source)) if dist.is_main else None
    with echo.stage("caches"), dist.main_first("caches"), dist.alone():  # the main process builds, the others read
        cache = CacheOptions(batch_size=cfg.cache.batch_size,
                             also=tuple(aux_specs(cfg.cache.precompute, cfg.cache.value_temperatures,
                                                  cfg.cache.q_sources)))
        ts = assemble_training_set(plan.tokenized_train, loss, loss_cfg, reference=ref_source, teacher=teacher_source,
                                   teacher_reference=tref_source, pad_id=plan.pad_id, eos_id=plan.eos_id,
                                   student=ModelSource.from_path(plan.paths["student"], dtype=m.dtype,
                                                                 trust_remote_code=m.trust_remote_code), teacher_vocab=plan.teacher_vocab, cache=cache,
                                   teacher_tokens=plan.teacher_tokens,
                                   subsample=cfg.data.subsample, seed=cfg.seed, progress=progress, say=echo)
    if dist.enabled:
        built = dist.gather({name: list(c.built) for name, c in ts.caches.items()})
        metrics["distributed"] = {"processes": dist.world_size, "backend": dist.backend,
                                  "caches_built_by_rank": built}
    if "teacher" in ts.caches:
        metrics["cache_bytes_per_token"] = ts.caches["teacher"].stats["bytes_per_token"]
    settings = loss.eval_settings(loss_cfg)
    if settings.offset_column:
        metas = [json.loads(x) for x in ts.full["meta"]] if "meta" in ts.full.column_names else None
        metrics.update(teacher_signal(ts.full[settings.offset_column], metas))

    # The main process checkpoints into the run folder; the others keep their share of a checkpoint
    # (their RNG state) in a scratch folder of their own and resume from the main process's checkpoint.
    out_dir = run_dir / "checkpoint" if dist.is_main else dist.scratch_dir(run_dir)
    if not dist.is_main and resume is None:
        shutil.rmtree(out_dir, ignore_errors=True)  # an older attempt's RNG states
    selector = None
    if cfg.eval.checkpoints:
        from tvkd.evaluation.validation import checkpoint_selector

        selector = checkpoint_selector(plan, testbed=uses_testbed(cfg), say=echo)
        callbacks = [*(callbacks or []), selector]
    with echo.stage("train"):
        policy, train_metrics = train_policy(plan.paths["student"], ts.train, loss, loss_cfg, cfg=cfg,
                                             out_dir=out_dir, pad_id=plan.pad_id, progress=progress,
                                             say=echo, reference=ref_source, teacher=teacher_source,
                                             teacher_vocab=plan.teacher_vocab, eos_id=plan.eos_id,
                                             callbacks=callbacks, resume=resume)
        metrics.update(train_metrics)
    if selector is not None:
        metrics["val/checkpoints"] = selector.history
        metrics["val/checkpoint_step"] = selector.best_step
        echo(f"  checkpoint picked on validation: step {selector.best_step} of {train_metrics['train_steps']}")
    if not dist.is_main:
        return None  # evaluation and the run folder are the main process's

    def evaluate() -> tuple[dict[str, Any], list | None, dict[str, list]]:
        if cfg.train.save_model:
            policy.save_pretrained(str(run_dir / "model"))
            plan.tokenizer.save_pretrained(str(run_dir / "model"))
        with echo.stage("evaluate"):
            ctx = EvalContext(cfg=cfg, policy=policy, tokenizer=plan.tokenizer, pad_id=plan.pad_id, settings=settings,
                              train=plan.tokenized_train, test=plan.tokenized_test,
                              test_examples=plan.test_data.examples if plan.test_data else None,
                              reference=ref_source, teacher=teacher_source, teacher_vocab=plan.teacher_vocab,
                              teacher_signal=ts.needs.teacher, testbed=uses_testbed(cfg), progress=progress)
            metrics.update(run_evaluators_with(ctx, plan.teacher_tokens, say=echo))
            metrics.update(_validate(plan, policy, echo, progress, ctx))
        metrics["seconds"] = dict(echo.timings)
        metrics["peak_memory_mb"] = dict(echo.peaks)
        metrics["tokenize"] = tokenize_counts(plan)
        metrics["loss_config"] = asdict(loss_cfg)
        return metrics, ctx.outputs, ctx.items

    return evaluate
