"""The contract between the trainer and every loss.

Layout (METHODS A.1). A batch holds B preference pairs as 2B rows: rows 0..B-1 are the chosen
responses, rows B..2B-1 the rejected ones, pair i = rows (i, B+i). Every per-token tensor is
*response-aligned*: index t is response token a_t (t = 0..T_i-1, the last one EOS), predicted
by the logits at state s_t. State tensors (potentials) have one more column: index t is state
s_t for t = 0..T_i, with s_{T_i} the state after EOS. Right padding; `mask` marks tokens and
`state_mask` marks states.

A loss is a class registered into `LOSSES` with a config dataclass. It declares what it needs
(`Needs`), may add per-pair columns to the whole training set once before training
(`prepare`, e.g. the TVKD pair offset and its shuffled control), and computes a scalar loss
plus detached metrics from a `ScoredBatch`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tvkd.registry import Registry


@dataclass(frozen=True)
class AuxSpec:
    """One cached teacher quantity: an aux reward at one value temperature and Q source.

    `temperature` is β_V and only matters for `soft_value`; it is None for the others.
    """

    name: str
    q_source: str = "logits"  # "logits" (Lemma 1) | "logprobs"
    temperature: float | None = None

    @property
    def column(self) -> str:
        """Column name (without the chosen/rejected prefix), e.g. ``soft_value@2``."""
        col = self.name
        if self.q_source != "logits":
            col += f"[{self.q_source}]"
        if self.temperature is not None:
            col += f"@{self.temperature:g}"
        return col


@dataclass(frozen=True)
class Needs:
    """What the pipeline must compute (and cache) for a loss; nothing else is computed."""

    reference: bool = False  # π_ref per-token log-probs of chosen and rejected (cached)
    aux: tuple[AuxSpec, ...] = ()  # teacher aux rewards (cached; used by `prepare` or the batch)
    topk: int | None = None  # teacher top-k log-probs + ids + remaining mass (cached)
    student_logits: bool = False  # response-aligned student logits [2B, T, V] in the batch
    teacher_reference_aux: tuple[AuxSpec, ...] = ()  # the same quantities from the teacher's SFT model


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

    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    # Detached per-batch scalars to log, e.g. "margin", "reward_accuracy", "psi/offset_mean".
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    # [B] per-pair implicit-reward margins (detached), used for reward accuracy.
    margins: torch.Tensor | None = None


class PreferenceLoss:
    """Base class of every registered loss.

    Lifecycle: the pipeline builds ``cfg = Loss.Config(**options)``, calls ``needs(cfg)`` to
    decide what to compute and cache, ``prepare(dataset, cfg, seed)`` once on the training
    set (after the caches are joined to it), ``batch_columns(cfg)`` to know which extra
    columns to collate, and ``__call__(batch, cfg)`` at every step.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object

    def needs(self, cfg: Any) -> Needs:
        return Needs()

    def prepare(self, dataset: Any, cfg: Any, *, seed: int) -> Any:
        """Add per-pair columns to a `datasets.Dataset` once before training (default: none)."""
        return dataset

    def batch_columns(self, cfg: Any) -> dict[str, str]:
        """Extra columns to put in `ScoredBatch.columns`: name -> "pair" | "token" | "state" | "topk"."""
        return {}

    def __call__(self, batch: ScoredBatch, cfg: Any) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


LOSSES: Registry[type[PreferenceLoss]] = Registry("loss")


def build_config(loss_cls: type[PreferenceLoss], options: dict[str, Any] | None) -> Any:
    """Build a loss config from a dict, naming unknown options and the valid ones."""
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(loss_cls.Config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"loss {loss_cls.name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(sorted(fields))}"
        )
    return loss_cls.Config(**options)
