"""What a testbed build shows while it runs: stage names on every progress bar, and time estimates.

Bars. A build runs third-party bars (the trainer's step bar, TRL's reference pass, ``datasets``'
map bars) and `tvkd.generation.generate`'s bar, none of which knows the stage it belongs to.
Inside ``labelled_bars("testbed stage 3/7 teacher_pairs")`` every tqdm bar this thread creates is
described as ``"<stage>: <its own description>"``; a bar with no description of its own (the
trainer's) or the generic ``"generate"`` takes the current `activity` instead, e.g.
``testbed stage 3/7 teacher_pairs: sampling train``. The hook wraps ``tqdm.std.tqdm.__init__``
(every tqdm class derives from it) only while some build is inside the context, and reads the
label from a context variable, so other threads' bars and everything after the build are untouched.
Labels change descriptions only: nothing that a stage computes depends on them.

Estimates. `estimate_stage` gives a stage's expected wall time from the work the config asks for
(conversations × epochs, pairs, prompts × samples × tokens, ...) times costs measured on the
development machine (2 CPU cores, one torch thread); `estimate_stage` writes out the rule. The
build prints them; on another machine or under load they are off by a factor, not a shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import TestbedConfig

# ---------------------------------------------------------------------------------------------
# Stage labels on progress bars

_STAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("testbed_stage", default=None)
_ACTIVITY: contextvars.ContextVar[str | None] = contextvars.ContextVar("testbed_activity", default=None)
GENERIC_DESCRIPTIONS = frozenset({"", "generate"})
"""Bar descriptions that say nothing about the stage's step: replaced by the current activity."""

_hook_lock = threading.Lock()
_hook_users = 0
_original_init: Any = None


def bar_description(desc: str | None) -> str | None:
    """The description a bar created now gets: its own, prefixed by the current stage label."""
    stage = _STAGE.get()
    if stage is None:
        return desc
    doing = _ACTIVITY.get()
    if not desc or desc in GENERIC_DESCRIPTIONS:
        return f"{stage}: {doing}" if doing else stage
    return f"{stage}: {desc}"


def _install_hook() -> None:
    global _hook_users, _original_init
    from tqdm import std

    with _hook_lock:
        _hook_users += 1
        if _hook_users > 1:
            return
        _original_init = std.tqdm.__dict__["__init__"]  # a partialmethod (tqdm's env-var defaults)
        unlabelled = std.tqdm.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if _STAGE.get() is not None:
                if len(args) > 1:  # tqdm(iterable, desc, ...)
                    args = (args[0], bar_description(args[1]), *args[2:])
                else:
                    kwargs["desc"] = bar_description(kwargs.get("desc"))
            unlabelled(self, *args, **kwargs)

        std.tqdm.__init__ = __init__  # type: ignore[method-assign]


def _remove_hook() -> None:
    global _hook_users, _original_init
    from tqdm import std

    with _hook_lock:
        _hook_users -= 1
        if _hook_users == 0:
            std.tqdm.__init__ = _original_init  # type: ignore[method-assign]
            _original_init = None


@contextlib.contextmanager
def labelled_bars(stage: str) -> Iterator[None]:
    """Every tqdm bar this thread creates inside is described as ``"<stage>: ..."``."""
    token = _STAGE.set(stage)
    _install_hook()
    try:
        yield
    finally:
        _remove_hook()
        _STAGE.reset(token)


@contextlib.contextmanager
def activity(what: str) -> Iterator[None]:
    """Name the step under way (``"training"``, ``"sampling train"``): nameless bars take this name."""
    token = _ACTIVITY.set(what)
    try:
        yield
    finally:
        _ACTIVITY.reset(token)


# ---------------------------------------------------------------------------------------------
# Time estimates

# Costs measured on the machine this project is developed on (2 CPU cores; one torch thread, the
# default `num_threads`; the default list lengths), from two builds of the default config (their
# stage wall times and the trainers' `train_runtime`; they differed by up to 20% with the machine's
# load), timings of greedy evaluation, of the trainers' set-up and of the imports, and a build of
# the tests' tiny config (the fixed overheads). A cost that depends on the model is given at the
# default student's and teacher's sizes; at other sizes it is linear in the parameter count: a
# fixed part per row (Python and kernel-launch overhead, most of a tiny model's time) plus a part
# per parameter.
_ANCHOR_PARAMS = (86_336, 664_704)  # default student, default teacher
SFT_TRAIN_S = (0.65e-3, 2.2e-3)  # per conversation per epoch (SFTTrainer, batches of 32)
SFT_PREP_S = 0.27e-3  # per conversation: chat template, masks, the SFT dataset's label map
DPO_TRAIN_S = (1.7e-3, 4.9e-3)  # per pair per epoch (DPOTrainer, batches of 32)
DPO_PREP_S = (1.0e-3, 2.7e-3)  # per pair: tokenising and the precomputed reference pass
SAMPLE_S = (1.55e-5, 6.1e-5)  # per prompt × sample × new token (batches of 256 prompts × k samples)
GREEDY_S = (4.0e-5, 9.0e-5)  # per test prompt × new token (greedy evaluation, 256 prompts a batch)
# (Generation stops once every sequence of a batch has ended: these two hold for trained default
# models, whose answers end after ~5 words; a weak model that runs to `max_new_tokens` takes up to
# twice as long, as a 2-epoch teacher did.)
DATA_S = 2e-5  # per prompt drawn (test, pair and SFT prompts) and its JSONL row
STAGE_OVERHEAD_S = {"data": 0.01, "sft": 0.3, "pairs": 0.1, "dpo": 0.4}  # load, save, set up
TRL_IMPORT_S = 3.0  # the first training stage of a process imports TRL and datasets


def model_parameters(cfg: TestbedConfig, role: str) -> int:
    """Parameters of the teacher's or student's tiny Llama (untied embeddings), from the config."""
    from .tokenizer import vocabulary

    vocab = len(vocabulary(cfg.num_symbols, cfg.max_len))
    h, inter, layers = (getattr(cfg, f"{role}_{k}") for k in ("hidden", "intermediate", "layers"))
    return 2 * vocab * h + h + layers * (4 * h * h + 3 * h * inter + 2 * h)


def _cost(at_anchors: tuple[float, float], params: int) -> float:
    """A per-row cost at `params` parameters, linear through the two anchor sizes."""
    (p0, p1), (c0, c1) = _ANCHOR_PARAMS, at_anchors
    slope = (c1 - c0) / (p1 - p0)
    return max(c0 - slope * p0, 0.0) + slope * params


def estimate_stage(cfg: TestbedConfig, stage: str, trl_imported: bool | None = None) -> tuple[float, str]:
    """(estimated seconds, the work counted) for building `stage` with `cfg`.

    The rule, stage by stage (P = the stage model's parameter count, costs as measured above):
      data           DATA_S × (num_test + num_pref_test + num_pref_train + num_sft × (1 + two_turn_rate))
      *_sft          SFT_PREP_S × num_sft + SFT_TRAIN_S(P) × num_sft × epochs + greedy evaluation
      *_pairs        SAMPLE_S(P) × (num_pref_train + num_pref_test) × samples_per_prompt × max_new_tokens
      *_dpo          DPO_PREP_S(P) × num_pref_train + DPO_TRAIN_S(P) × num_pref_train × epochs
                     + greedy evaluation
      greedy evaluation = GREEDY_S(P) × num_test × max_new_tokens
    plus the stage's fixed overhead, and TRL_IMPORT_S for a training stage when TRL is not yet
    imported (``trl_imported``; None: whether this process has imported it). Epochs count
    fractions as they are; batch sizes enter only through the measured per-row costs (the
    default batches: 32 conversations, 32 pairs).
    """
    role, _, kind = stage.partition("_")
    overhead = STAGE_OVERHEAD_S.get(kind or stage, 0.0)
    if stage == "data":
        prompts = cfg.num_test + cfg.num_pref_test + cfg.num_pref_train
        prompts += cfg.num_sft + round(cfg.num_sft * cfg.two_turn_rate)
        return overhead + DATA_S * prompts, f"{prompts} prompts"
    if kind not in {"sft", "pairs", "dpo"} or role not in {"teacher", "student"}:
        raise ValueError(f"no estimate for an unknown stage {stage!r}")
    params = model_parameters(cfg, role)
    greedy = _cost(GREEDY_S, params) * cfg.num_test * cfg.max_new_tokens
    if trl_imported is None:
        trl_imported = "trl" in sys.modules
    imports = TRL_IMPORT_S if kind != "pairs" and not trl_imported else 0.0
    if kind == "sft":
        epochs = getattr(cfg, f"{role}_sft_epochs")
        work = cfg.num_sft * (SFT_PREP_S + _cost(SFT_TRAIN_S, params) * epochs)
        what = f"{_epochs(epochs)} x {cfg.num_sft} conversations, {cfg.num_test} greedy test prompts"
        return overhead + imports + work + greedy, what
    if kind == "pairs":
        prompts = cfg.num_pref_train + cfg.num_pref_test
        work = _cost(SAMPLE_S, params) * prompts * cfg.samples_per_prompt * cfg.max_new_tokens
        return overhead + work, f"{prompts} prompts x {cfg.samples_per_prompt} samples"
    epochs = cfg.dpo_epochs if role == "teacher" else cfg.student_dpo_epochs
    pairs = cfg.num_pref_train
    work = pairs * (_cost(DPO_PREP_S, params) + _cost(DPO_TRAIN_S, params) * epochs)
    what = f"{_epochs(epochs)} x {pairs} pairs, {cfg.num_test} greedy test prompts"
    return overhead + imports + work + greedy, what


def _epochs(epochs: float) -> str:
    return f"{epochs:g} epoch" + ("" if epochs == 1 else "s")


def estimate_build(cfg: TestbedConfig, stages: Iterable[str]) -> float:
    """Estimated seconds to build `stages` in order, in this process (TRL is imported once)."""
    imported, total = "trl" in sys.modules, 0.0
    for stage in stages:
        total += estimate_stage(cfg, stage, trl_imported=imported)[0]
        imported = imported or stage.endswith(("_sft", "_dpo"))
    return total


def format_seconds(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``: precise enough for an estimate, short for a log line."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{math.floor(seconds + 0.5)} s"
    minutes, rest = divmod(math.floor(seconds + 0.5), 60)
    return f"{minutes} min {rest:02d} s"
