"""DPO (Rafailov et al., 2023), with cDPO label smoothing (Mitchell, 2023).

    L_DPO = −log σ(β·(Δ_w − Δ_l)),   Δ_i = Σ_t [log π_θ(a_t|s_t) − log π_ref(a_t|s_t)]   (DPO paper, Eq. 7)

cDPO (METHODS A.7; TRL 0.12 semantics, which current TRL's `sigmoid` no longer applies):

    L = (1 − ε)·(−log σ(β·h)) − ε·log σ(−β·h),   h = Δ_w − Δ_l

`reference_free=True` drops π_ref (Δ_i = Σ_t log π_θ), as TRL's `reference_free`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tvkd.losses.base import LOSSES, LossOutput, Needs, PreferenceLoss, ScoredBatch


def log_ratios(batch: ScoredBatch, include_reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ_w, Δ_l), each [B]: Σ_t log π_θ − Σ_t log π_ref per response (no π_ref if not included).

    Shared by every DPO-family loss so that their margins are computed by the same operations
    in the same order (TVKD with a zero offset then equals DPO to the last bit).
    """
    scores = batch.sequence_logps()
    if include_reference:
        scores = scores - batch.sequence_ref_logps()
    return batch.split(scores)


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


@LOSSES.register(
    "dpo",
    needs="reference log-probs (unless reference_free)",
    citation="Rafailov et al., 2023, Direct Preference Optimization, NeurIPS (Eq. 7); cDPO: Mitchell, 2023",
    reference_free=False,
)
class DPO(PreferenceLoss):
    """L = −log σ(β(Δ_w − Δ_l)) (DPO Eq. 7), optionally label-smoothed as cDPO."""

    name = "dpo"

    @dataclass
    class Config:
        beta: float = field(default=0.1, metadata={"help": "β, the KL-penalty scale of the implicit reward."})
        label_smoothing: float = field(
            default=0.0,
            metadata={
                "help": "cDPO ε in [0, 0.5): the probability that a preference label is flipped "
                "(L = (1−ε)·(−logσ(βh)) − ε·logσ(−βh)); 0 is plain DPO."
            },
        )
        reference_free: bool = field(
            default=False, metadata={"help": "Drop π_ref: Δ_i = Σ_t log π_θ(a_t|s_t) (TRL's reference_free)."}
        )

        def __post_init__(self):
            if not self.beta > 0:
                raise ValueError(f"dpo: beta must be > 0, got {self.beta}")
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ValueError(f"dpo: label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")

    def needs(self, cfg: Config) -> Needs:
        return Needs(reference=not cfg.reference_free)

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        chosen, rejected = log_ratios(batch, include_reference=not cfg.reference_free)
        chosen_rewards, rejected_rewards = cfg.beta * chosen, cfg.beta * rejected
        margin = cfg.beta * (chosen - rejected)
        if cfg.label_smoothing == 0.0:
            # the plain branch keeps the loss (and its gradient) bit-identical to TRL's sigmoid
            losses = -F.logsigmoid(margin)
        else:
            eps = cfg.label_smoothing
            losses = -(1.0 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
        metrics = {"loss": losses.detach().mean(), "margin": margin.detach().mean()}
        metrics.update(reward_metrics(chosen_rewards, rejected_rewards))
        return LossOutput(loss=losses.mean(), metrics=metrics, margins=margin.detach())
