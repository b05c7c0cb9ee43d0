"""The contract between the trainer, the caches, the evaluators and every plug-in.

This is the bottom floor of the package: it imports nothing of tvkd but the registry and the
torch-free value checks (`tvkd.checks`: `ConfigError`, `check_value`, `checked_fields`), and
everything above it (aux rewards, losses, caches, trainer, pipeline) imports it. It holds

- the plug-in registries `AUX_REWARDS` and `LOSSES`, each filled by discovery on first use
  (every module of ``tvkd.aux_rewards``; of ``tvkd.losses`` and ``baselines``; plus the entry-point
  groups ``tvkd.aux_rewards`` and ``tvkd.losses`` of installed packages);
- `AuxSpec`, one cached teacher quantity (an aux reward at one value temperature and Q source);
- `Needs`, what a loss asks the pipeline to compute and cache;
- `ScoredBatch` and `LossOutput`, what a loss reads and returns at every step;
- `PreferenceLoss`, the base class of every loss, and `EvalSettings`, the settings of a loss
  that evaluators read (never guessed from attribute names).

Batch layout (docs/methods.md §A.1). A batch holds B preference pairs as 2B rows: rows 0..B-1 are
the chosen responses, rows B..2B-1 the rejected ones, pair i = rows (i, B+i). Every per-token
tensor is *response-aligned*: index t is response token a_t (t = 0..T_i-1, the last one EOS),
predicted by the logits at state s_t. State tensors (potentials) have one more column: index t
is state s_t for t = 0..T_i, with s_{T_i} the state after EOS. Right padding; `mask` marks
tokens and `state_mask` marks states.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tvkd.checks import ConfigError, check_value, checked_fields  # noqa: F401 - part of the contract
from tvkd.registry import Discovery, Registry

AUX_REWARDS: Registry[Any] = Registry(
    "aux reward", Discovery(packages=("tvkd.aux_rewards",), entry_points="tvkd.aux_rewards")
)
"""Aux rewards: a function of the teacher's logit statistics at one state (see `tvkd.aux_rewards`),
registered with ``kind`` ("action" | "state"), ``formula``, ``uses_temperature``, ``uses_q`` and
``reference`` (a float64 one-state computation the tests compare it against)."""

LOSSES: Registry[type[PreferenceLoss]] = Registry(
    "loss", Discovery(packages=("tvkd.losses", "baselines"), entry_points="tvkd.losses")
)
"""Losses: `PreferenceLoss` subclasses registered with ``needs`` (a sentence), ``citation`` and
``reference_free``."""

KINDS = ("action", "state")
Q_SOURCES = ("logits", "logprobs")


@dataclass(frozen=True)
class AuxSpec:
    """One cached teacher quantity: an aux reward at one value temperature and Q source.

    The spec is canonical: the temperature is kept only for aux rewards that use one (β_V for
    `soft_value`) and the Q source only for those whose value depends on it, so one cached column
    serves every config that yields the same numbers (`max` under either Q source is the column
    ``max``). `kind` ("action" or "state") is read from the aux reward's registration.
    """

    name: str
    q_source: str = "logits"  # "logits" (Lemma 1) | "logprobs"
    temperature: float | None = None
    kind: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        meta = AUX_REWARDS.meta(self.name)  # unknown name: the registry's "did you mean" error
        if self.q_source not in Q_SOURCES:
            raise ValueError(f"unknown q_source {self.q_source!r}; valid: {', '.join(Q_SOURCES)}")
        temperature = self.temperature
        if meta.get("uses_temperature"):
            if temperature is None:
                raise ValueError(f"aux reward {self.name!r} needs a value temperature")
            temperature = float(temperature)
            if not (temperature > 0 and math.isfinite(temperature)):
                raise ValueError(f"the value temperature of {self.name!r} must be a positive number, "
                                 f"got {self.temperature!r}")
        else:
            temperature = None
        object.__setattr__(self, "temperature", temperature)
        if not meta.get("uses_q"):
            object.__setattr__(self, "q_source", "logits")
        kind = meta.get("kind")
        if kind not in KINDS:
            raise ValueError(f"aux reward {self.name!r} is registered with kind {kind!r}; valid: {', '.join(KINDS)}")
        object.__setattr__(self, "kind", kind)

    @property
    def column(self) -> str:
        """Column name (without the chosen/rejected prefix), e.g. ``soft_value@2``."""
        col = self.name
        if self.q_source != "logits":
            col += f"[{self.q_source}]"
        if self.temperature is not None:
            col += f"@{self.temperature:g}"
        return col

    @property
    def is_state(self) -> bool:
        """A state potential Φ(s) (T+1 values per response) rather than an action reward (T)."""
        return self.kind == "state"


@dataclass(frozen=True)
class OnPolicy:
    """Student samples inside training (GKD): with probability `fraction` a batch's responses are
    replaced by samples of the current student at `temperature` (at most `max_new_tokens`, cut after
    the first end-of-turn token), and the loss is computed on those."""

    fraction: float = 0.5
    temperature: float = 0.9
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"on-policy fraction must lie in [0, 1], got {self.fraction}")
        if not self.temperature > 0 or self.max_new_tokens < 1:
            raise ValueError("on-policy sampling needs a temperature > 0 and max_new_tokens >= 1")


@dataclass(frozen=True)
class ContrastModels:
    """A DPO model and a reverse-DPO model (pairs swapped), trained from the student's initialisation on
    the training pairs (TIS-DPO's token-weight estimators); cached like every stage. Their per-token
    log-probs join the training set as ``{side}/contrast:dpo_logps`` and ``{side}/contrast:rev_logps``."""

    beta: float = 0.1
    learning_rate: float = 3e-5
    epochs: float = 1.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not (self.beta > 0 and self.learning_rate > 0 and self.epochs > 0 and self.batch_size >= 1):
            raise ValueError("contrast models need beta > 0, learning_rate > 0, epochs > 0 and batch_size >= 1")


CONTRAST_PREFIX = "contrast:"


@dataclass(frozen=True)
class Needs:
    """What the pipeline must compute (and cache) for a loss; nothing else is computed.

    Cached once per (data, model) and reused by every run: `reference`, `aux`, `topk`,
    `teacher_reference_aux`. Computed online at every step, because a cache would hold T·V floats
    per response (e.g. 0.5 MB per token for a 128k vocabulary): `reference_logits`, `teacher_logits`.
    """

    reference: bool = False  # π_ref per-token log-probs of chosen and rejected (cached): batch.ref_logps
    aux: tuple[AuxSpec, ...] = ()  # teacher aux rewards (cached): columns "{side}/<column>"
    topk: int | None = None  # teacher top-k log-probs + ids + remaining mass (cached): "topk_ids", ...
    student_logits: bool = False  # response-aligned student logits [2B, T, V] in the batch
    # The same aux columns from the teacher's SFT model π_Tref (models.teacher_reference), cached:
    # columns "{side}/tref:<column>", e.g. the teacher's implicit reward β_T·(log π_T − log π_Tref).
    teacher_reference_aux: tuple[AuxSpec, ...] = ()
    teacher_reference_topk: int | None = None  # π_Tref's top-k (cached): columns "tref:topk_ids", ...
    reference_logits: bool = False  # online: π_ref logits [2B, T, V] at every step (batch.ref_logits)
    teacher_logits: bool = False  # online: teacher logits [2B, T, V] at every step (batch.teacher_logits)
    # Greedy rollouts (cached, `tvkd.rollouts`) that replace one side of every pair before any other
    # cache is computed: chosen_from="teacher" (SeqKD), rejected_from="student" (ADPA: the student's
    # initialisation answers); rollout_max_new_tokens is their length budget.
    chosen_from: str | None = None
    rejected_from: str | None = None
    rollout_max_new_tokens: int = 512
    on_policy: OnPolicy | None = None  # student samples inside training (online; see OnPolicy)
    contrast: ContrastModels | None = None  # DPO and reverse-DPO models' per-token log-probs (cached)

    @property
    def teacher(self) -> bool:
        """Whether the teacher model is needed at all (cached columns or online logits)."""
        return bool(self.aux) or bool(self.topk) or self.teacher_logits or self.chosen_from == "teacher"

    @property
    def teacher_reference(self) -> bool:
        return bool(self.teacher_reference_aux) or bool(self.teacher_reference_topk)

    def __post_init__(self) -> None:
        if self.chosen_from not in (None, "teacher"):
            raise ValueError(f"Needs.chosen_from must be None or 'teacher', got {self.chosen_from!r}")
        if self.rejected_from not in (None, "student"):
            raise ValueError(f"Needs.rejected_from must be None or 'student', got {self.rejected_from!r}")
        if self.on_policy is not None and (self.reference or self.aux or self.topk or self.teacher_reference):
            raise ValueError("on-policy samples have no cached reference or teacher columns: a loss that samples "
                             "inside training reads its models online (reference_logits / teacher_logits)")


TEACHER_REFERENCE_PREFIX = "tref:"
"""Prefix of the teacher-reference (π_Tref) columns, e.g. ``chosen/tref:log_prob``."""


@dataclass(frozen=True)
class ShapingSignal:
    """The teacher signal a loss shapes with: an aux reward and how it becomes per-token ψ_t."""

    spec: AuxSpec
    gamma: float = 1.0
    shaping: str = "pbrs"
    terminal: str = "teacher"

    def options(self) -> dict[str, Any]:
        """Keyword options of `tvkd.shaping` functions (none for an action reward)."""
        if not self.spec.is_state:
            return {"kind": "action"}
        return {"kind": "state", "gamma": self.gamma, "shaping": self.shaping, "terminal": self.terminal}


@dataclass(frozen=True)
class EvalSettings:
    """What evaluators read from a loss's configuration (`PreferenceLoss.eval_settings`).

    implicit_reward_beta: β in the student's implicit reward S = β·(log π_θ − log π_ref)(y|x)
        that margin accuracy ranks pairs by (Table 5); 1 for losses without a β.
    shaping: the teacher signal the loss trains with, scored by Table 3's shaping column;
        None: Table 3 scores the paper's default (soft_value at β_V = 2, pbrs, γ = 1).
    value_temperature: β_V for value alignment (Table 4); None: 2.0, the paper's best.
    offset_column: the per-pair column `prepare` adds holding the teacher offset, whose agreement
        with the labels and the oracle is logged as ``teacher_signal/*``; None if there is none.
    """

    implicit_reward_beta: float = 1.0
    shaping: ShapingSignal | None = None
    value_temperature: float | None = None
    offset_column: str | None = None


@dataclass
class ScoredBatch:
    """Student scores for B pairs (2B rows), plus whatever the loss declared it needs."""

    logps: torch.Tensor  # [2B, T] fp32 log π_θ(a_t|s_t); 0 where ~mask
    mask: torch.Tensor  # [2B, T] bool
    ref_logps: torch.Tensor | None = None  # [2B, T] fp32 log π_ref(a_t|s_t); 0 where ~mask
    logits: torch.Tensor | None = None  # [2B, T, V] student logits at s_0..s_{T-1} (fp32 math is the loss's job)
    # Per-row token columns ([2B, T]), state columns ([2B, T+1]), top-k columns ([2B, T, k]) and
    # per-pair columns ([B]) by name, e.g. "soft_value@2" -> [2B, T+1], "tvkd_offset" -> [B].
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    state_mask: torch.Tensor | None = None  # [2B, T+1] bool
    pair_index: torch.Tensor | None = None  # [B] int64, the pairs' row numbers in the training set
    # [2B, T] int64 response token ids a_t (any valid id where ~mask); needed by losses that look
    # the taken token up in a distribution other than π_θ's, e.g. the 51-bin projection.
    token_ids: torch.Tensor | None = None
    ref_logits: torch.Tensor | None = None  # [2B, T, V] π_ref logits at s_0..s_{T-1} (Needs.reference_logits)
    teacher_logits: torch.Tensor | None = None  # [2B, T, V] teacher logits at s_0..s_{T-1} (Needs.teacher_logits)

    @property
    def num_pairs(self) -> int:
        return self.logps.shape[0] // 2

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) halves of a [2B, ...] tensor."""
        b = self.num_pairs
        return t[:b], t[b:]

    def sequence_logps(self) -> torch.Tensor:
        """[2B] Σ_t log π_θ(a_t|s_t) over response tokens (no length normalisation)."""
        return (self.logps * self.mask).sum(-1)

    def sequence_ref_logps(self) -> torch.Tensor:
        if self.ref_logps is None:
            raise ValueError("this loss needs reference log-probs but the batch has none (Needs.reference)")
        return (self.ref_logps * self.mask).sum(-1)

    def log_ratios(self, include_reference: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δ_w, Δ_l), each [B]: Σ_t log π_θ − Σ_t log π_ref per response (no π_ref if not included).

        Every DPO-family loss takes its margins from here, so they are computed by the same
        operations in the same order (TVKD with a zero offset then equals DPO to the last bit).
        """
        scores = self.sequence_logps()
        if include_reference:
            scores = scores - self.sequence_ref_logps()
        return self.split(scores)

    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    # Detached per-batch scalars to log, e.g. "margin", "reward_accuracy", "psi/offset_mean".
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    # [B] per-pair implicit-reward margins (detached), used for reward accuracy.
    margins: torch.Tensor | None = None


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The implicit-reward metrics every DPO-family loss logs (TRL's `rewards/*` convention).

    `reward_accuracy` = mean[r_w > r_l], a tie counting as wrong, as TRL's `rewards/accuracies`.
    """
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    diff = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "reward_margin": diff.mean(),
        "reward_accuracy": (diff > 0).float().mean(),
    }


class PreferenceLoss:
    """Base class of every registered loss.

    Lifecycle: the pipeline builds ``cfg = Loss.Config(**options)`` (`build_config`), calls
    ``needs(cfg)`` to decide what to compute and cache, ``prepare(dataset, cfg, seed)`` once on
    the training set (after the caches are joined to it), ``batch_columns(cfg)`` to know which
    extra columns to collate, ``__call__(batch, cfg)`` at every step, and ``eval_settings(cfg)``
    when it evaluates the trained student.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    #: Options whose default changed in a release: when a config leaves one out, its resolved value joins the
    #: run's identity, so a run stored under the old default is never taken for one under the new.
    identity_defaults: ClassVar[tuple[str, ...]] = ()

    def needs(self, cfg: Any) -> Needs:
        return Needs()

    def prepare(self, dataset: Any, cfg: Any, *, seed: int) -> Any:
        """Add per-pair columns to a `datasets.Dataset` once before training (default: none)."""
        return dataset

    def batch_columns(self, cfg: Any) -> dict[str, str]:
        """Extra columns to put in `ScoredBatch.columns`: name -> "pair" | "token" | "state" | "topk"."""
        return {}

    def eval_settings(self, cfg: Any) -> EvalSettings:
        """The settings of this configuration that evaluators need (default: none of them)."""
        return EvalSettings()

    def meta_keys(self, cfg: Any) -> tuple[str, ...]:
        """Keys of the pairs' ``meta`` this configuration reads (checked in the loaded data before any work)."""
        return ()

    def __call__(self, batch: ScoredBatch, cfg: Any) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def build_config(loss_cls: type[PreferenceLoss], options: dict[str, Any] | None, where: str = "loss") -> Any:
    """Build a loss config from a dict: unknown options, wrong types and bad values name the option."""
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(loss_cls.Config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        import difflib

        close = [m for key in unknown for m in difflib.get_close_matches(str(key), sorted(fields), n=1)]
        raise ConfigError(
            f"loss {loss_cls.name!r} has no option(s) {', '.join(map(repr, unknown))}"
            + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
            + f"; valid options: {', '.join(sorted(fields))}"
        )
    values = checked_fields(loss_cls.Config, options, f"{where}.", "option")
    try:
        return loss_cls.Config(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
