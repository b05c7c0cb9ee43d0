"""TVKD: preference distillation with teacher-value reward shaping (the paper's Eq. 3, Appendix B.3).

The teacher's soft value (or another aux reward of Table 5) shapes the per-token reward, and
the shaping enters the DPO margin as a fixed per-pair offset:

    margin = β·(Δ_w − Δ_l) − α·(Ψ_w − Ψ_l)        (Eq. 3; ψ sits in the denominator, hence the minus)
    L      = −log σ(margin)
    Δ_i    = Σ_t [log π_θ(a_t|s_t) − log π_ref(a_t|s_t)]     (`include_reference=false`: no π_ref, Eq. 3 literally)
    Ψ_i    = Σ_t ψ_t,   ψ_t = γ·Φ(s_{t+1}) − Φ(s_t)          (state aux, `shaping=pbrs`; see tvkd.shaping)
    Φ(s)   = β_V·logsumexp(z_T(s)/β_V)                       (`aux=soft_value`, Lemma 1)

Because Ψ does not depend on θ, the gradient is DPO's with a shifted margin (Eq. 4):

    ∇_θ L = −σ(−margin)·β·(∇_θ Δ_w − ∇_θ Δ_l)

so the offset Ψ_w − Ψ_l is computed once per pair before training (`prepare`), from the cached
teacher columns ``chosen/<spec.column>`` and ``rejected/<spec.column>``, into the per-pair
column ``tvkd_offset``. The `shuffled` control permutes those offsets across the pairs of the
data set (a random cyclic permutation with `control_seed`, so no pair keeps its own offset):
the offsets' distribution is kept and their link to the pair is broken.

Decisions (docs/methods.md §A.3 leaves them open):
- Action aux rewards (`logits`, `log_prob`) enter as ψ_t = f(s_t, a_t); `gamma`, `shaping` and
  `terminal` describe state potentials only, so a non-default value with an action aux is an
  error rather than silently ignored. `value_temperature`/`tie_temperature` only affect
  `soft_value` and are ignored by the other aux rewards (their defaults cannot be told apart
  from a choice).
- `q_source` only changes the Q-dependent aux rewards (`logits`, `expectation`, `soft_value`);
  for the others the cached column is the same under either source (`make_spec`).
- Logged `reward_accuracy` is TRL's convention on the implicit reward β·Δ (without the offset),
  mean[β(Δ_w − Δ_l) > 0], so it is comparable with DPO's; `shaped_accuracy` is mean[margin > 0].
  `LossOutput.margins` is the implicit-reward margin β(Δ_w − Δ_l) (the Table 5 score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn.functional as F

from tvkd import shaping
from tvkd.api import (
    AUX_REWARDS,
    LOSSES,
    Q_SOURCES,
    AuxSpec,
    EvalSettings,
    LossOutput,
    Needs,
    PreferenceLoss,
    ScoredBatch,
    ShapingSignal,
    reward_metrics,
)
from tvkd.offsets import data_keys, reward_gaps

OFFSET_COLUMN = "tvkd_offset"
CONTROLS = ("none", "shuffled")
NORMS = ("none", "std")


def shuffled_order(n: int, fraction: float, seed: int) -> np.ndarray:
    """Indices that permute the offsets of a `fraction` of the n pairs among themselves (a random cycle).

    fraction 1 is `cyclic_permutation(n, seed)` itself (the shuffled control); below 1, a seeded
    random subset of round(fraction·n) pairs is cycled and the others keep their own offsets (the
    dial: the offsets' distribution is kept, their rank correlation with the truth falls with it).
    """
    if fraction >= 1.0:
        if n < 2:
            raise ValueError("the shuffled control needs at least 2 pairs")
        return cyclic_permutation(n, seed)
    order = np.arange(n)
    k = int(round(fraction * n))
    if k >= 2:
        subset = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
        order[subset] = subset[cyclic_permutation(k, seed)]
    return order


def cyclic_permutation(n: int, seed: int) -> np.ndarray:
    """A uniformly random n-cycle (Sattolo's algorithm): perm[i] != i for every i when n > 1."""
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: never a fixed point
        perm[i], perm[j] = perm[j], perm[i]
    return perm


@LOSSES.register(
    "tvkd",
    needs="one teacher aux reward (cached) + reference log-probs (unless include_reference=false)",
    citation="Preference Distillation via Value based Reinforcement Learning, arXiv 2509.16965 (Eq. 3, Eq. 4, "
    "Lemma 1, Appendix B.3)",
    reference_free=False,
)
class TVKD(PreferenceLoss):
    """margin = β(Δ_w − Δ_l) − α(Ψ_w − Ψ_l), L = −log σ(margin) (Eq. 3)."""

    name = "tvkd"

    @dataclass
    class Config:
        aux: str = field(
            default="soft_value",
            metadata={
                "help": "Teacher aux reward (Table 5): logits, log_prob, max, margin, expectation, soft_value."
            },
        )
        alpha: float = field(
            default=0.7, metadata={"help": "α, the weight of the shaping offset (paper F.3)."}
        )
        beta: float = field(default=0.1, metadata={"help": "β, the DPO scale of the implicit reward."})
        value_temperature: float = field(
            default=2.0, metadata={"help": "β_V, the soft-value temperature (paper F.4); soft_value only."}
        )
        tie_temperature: bool = field(
            default=False, metadata={"help": "Use β_V = β, Eq. 3's single β (overrides value_temperature)."}
        )
        gamma: float = field(default=1.0, metadata={"help": "γ, the discount in ψ_t = γΦ(s_{t+1}) − Φ(s_t)."})
        shaping: str = field(
            default="pbrs",
            metadata={
                "help": "pbrs: ψ_t = γΦ(s_{t+1}) − Φ(s_t); next_only: ψ_t = γΦ(s_{t+1}) (state aux only)."
            },
        )
        terminal: str = field(
            default="teacher",
            metadata={"help": "Φ(s_T) after EOS: teacher (its value there) or zero (state aux only)."},
        )
        include_reference: bool = field(
            default=True,
            metadata={"help": "Δ with π_ref (Appendix B.3); false: Δ_i = Σ log π_θ (Eq. 3 literally)."},
        )
        control: str = field(
            default="none",
            metadata={
                "help": "none, or shuffled: permute the pair offsets across the data set (negative control)."
            },
        )
        control_seed: int = field(
            default=0,
            metadata={"help": "Seed of the shuffled control's permutation (fixed across training seeds)."},
        )
        shuffle_fraction: float = field(
            default=1.0,
            metadata={"help": "With control=shuffled: the fraction of pairs whose offsets are permuted among "
                              "themselves (1: the full negative control; 0: none). The teacher-signal dial: the "
                              "offsets keep their distribution and lose a fraction of their link to the pair."},
        )
        offset_source: str = field(
            default="teacher",
            metadata={"help": "teacher: Ψ_w − Ψ_l from the teacher's aux reward (Eq. 3); data:<key> or "
                              "data:<chosen_key>,<rejected_key>: a gap in the pairs' meta, e.g. the testbed's "
                              "data:oracle_chosen,oracle_rejected (a perfect teacher: the positive control)."},
        )
        offset_norm: str = field(
            default="none",
            metadata={"help": "none (the paper's raw offsets) | std: offsets divided by their standard deviation "
                              "over the training pairs, so α is in units of it and sources compare at one α."},
        )
        q_source: str = field(
            default="logits",
            metadata={
                "help": "Q for the aux reward: logits (raw teacher logits, Lemma 1) or logprobs (log π_T)."
            },
        )

        def __post_init__(self):
            shaping.check_options(self.kind, self.gamma, self.shaping, self.terminal)
            if self.control not in CONTROLS:
                raise ValueError(f"tvkd: unknown control {self.control!r}; valid: {', '.join(CONTROLS)}")
            if not 0 <= self.shuffle_fraction <= 1:
                raise ValueError(f"tvkd: shuffle_fraction must lie in [0, 1], got {self.shuffle_fraction}")
            if self.offset_norm not in NORMS:
                raise ValueError(f"tvkd: offset_norm must be one of {', '.join(NORMS)}, got {self.offset_norm!r}")
            data_keys(self.offset_source, "tvkd", "offset_source")  # a malformed source names the option
            if self.q_source not in Q_SOURCES:
                raise ValueError(f"tvkd: unknown q_source {self.q_source!r}; valid: {', '.join(Q_SOURCES)}")
            if not self.beta > 0:
                raise ValueError(f"tvkd: beta must be > 0, got {self.beta}")
            if not self.alpha >= 0:
                raise ValueError(f"tvkd: alpha must be >= 0 (the offset's weight; 0 is DPO), got {self.alpha}")
            if not 0 < self.gamma <= 1:
                raise ValueError(f"tvkd: gamma must lie in (0, 1], got {self.gamma}")
            if not self.value_temperature > 0:
                raise ValueError(f"tvkd: value_temperature must be > 0, got {self.value_temperature}")

        @property
        def kind(self) -> str:
            return AUX_REWARDS.meta(self.aux)["kind"]  # unknown name: the registry's "did you mean"

        @property
        def spec(self) -> AuxSpec:
            """The one cached teacher quantity this config reads."""
            temperature = self.beta if self.tie_temperature else self.value_temperature
            return AuxSpec(self.aux, q_source=self.q_source, temperature=temperature)

        @property
        def signal(self) -> ShapingSignal:
            return ShapingSignal(self.spec, gamma=self.gamma, shaping=self.shaping, terminal=self.terminal)

    def needs(self, cfg: Config) -> Needs:
        if cfg.offset_source != "teacher":
            return Needs(reference=cfg.include_reference)
        return Needs(reference=cfg.include_reference, aux=(cfg.spec,))

    def meta_keys(self, cfg: Config) -> tuple[str, ...]:
        return data_keys(cfg.offset_source, "tvkd", "offset_source")

    def batch_columns(self, cfg: Config) -> dict[str, str]:
        return {OFFSET_COLUMN: "pair"}

    def eval_settings(self, cfg: Config) -> EvalSettings:
        return EvalSettings(implicit_reward_beta=cfg.beta,
                            shaping=cfg.signal if cfg.offset_source == "teacher" else None,
                            value_temperature=cfg.spec.temperature or cfg.value_temperature,
                            offset_column=OFFSET_COLUMN)

    def prepare(self, dataset: Any, cfg: Config, *, seed: int) -> Any:
        """Add the per-pair column ``tvkd_offset`` = Ψ_w − Ψ_l (permuted if `control=shuffled`).

        `seed` (the training seed) is not used: the shuffled control uses `control_seed`, so every
        training seed sees the same negative control.
        """
        if OFFSET_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(OFFSET_COLUMN)
        if cfg.offset_source == "teacher":
            dataset = self._teacher_offsets(dataset, cfg)
        else:
            gaps = reward_gaps(dataset, cfg.offset_source, 1.0, "tvkd", "offset_source")
            dataset = dataset.add_column(OFFSET_COLUMN, gaps.tolist())
        if cfg.offset_norm == "std" or cfg.control == "shuffled":
            values = np.asarray(dataset[OFFSET_COLUMN], dtype=np.float64)
            if cfg.offset_norm == "std":
                std = values.std()
                values = values / std if std > 0 else values
            if cfg.control == "shuffled":
                values = values[shuffled_order(len(values), cfg.shuffle_fraction, cfg.control_seed)]
            dataset = dataset.remove_columns(OFFSET_COLUMN).add_column(OFFSET_COLUMN, values.tolist())
        return dataset

    def _teacher_offsets(self, dataset: Any, cfg: Config) -> Any:
        column = cfg.spec.column
        chosen, rejected = f"chosen/{column}", f"rejected/{column}"
        missing = [c for c in (chosen, rejected) if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"tvkd needs the teacher cache columns {missing} (aux {cfg.aux!r}); "
                f"the data set has {sorted(dataset.column_names)}"
            )
        options = dict(kind=cfg.kind, gamma=cfg.gamma, shaping=cfg.shaping, terminal=cfg.terminal)

        def offsets(batch: dict[str, list]) -> dict[str, list[float]]:
            return {OFFSET_COLUMN: shaping.pair_offset_rows(batch[chosen], batch[rejected], **options)}

        return dataset.map(offsets, batched=True, desc="tvkd pair offsets")

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        if OFFSET_COLUMN not in batch.columns:
            raise ValueError(
                f"tvkd reads the per-pair column {OFFSET_COLUMN!r}; run TVKD.prepare on the data set"
            )
        chosen, rejected = batch.log_ratios(include_reference=cfg.include_reference)
        implicit = cfg.beta * (chosen - rejected)
        # same dtype as the margin: an fp64 offset column must not promote the loss
        offset = batch.columns[OFFSET_COLUMN].to(device=implicit.device, dtype=implicit.dtype)
        if offset.shape != implicit.shape:
            raise ValueError(
                f"{OFFSET_COLUMN} has shape {tuple(offset.shape)}, expected {tuple(implicit.shape)}"
            )
        margin = implicit - cfg.alpha * offset
        losses = -F.logsigmoid(margin)
        margin_d = margin.detach()
        metrics = {
            "loss": losses.detach().mean(),
            "margin": margin_d.mean(),
            "shaped_accuracy": (margin_d > 0).float().mean(),
            "psi/offset_mean": offset.mean(),
            "psi/offset_abs_mean": offset.abs().mean(),
            # population std: defined (0) for a single pair
            "psi/offset_std": offset.std(correction=0),
        }
        metrics.update(reward_metrics(cfg.beta * chosen, cfg.beta * rejected))
        return LossOutput(loss=losses.mean(), metrics=metrics, margins=implicit.detach())
