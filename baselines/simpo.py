"""SimPO (Meng, Xia, Chen, 2024), reference-free and length-normalised (docs/methods.md §A.5, §B.4.2).

The paper's Eq. 6, L = −log σ(β/|y_w|·log π_θ(y_w|x) − β/|y_l|·log π_θ(y_l|x) − γ), written as the official
code does (`princeton-nlp/SimPO scripts/simpo_trainer.py::simpo_loss`, sigmoid loss, no label smoothing):

    avg_i  = (1/T_i) Σ_t log π_θ(a_t|s_t)
    logits = (avg_w − avg_l) − γ/β
    L      = −log σ(β·logits)  (mean over pairs)  +  sft_weight · NLL(chosen)

NLL(chosen) is the official `sft_weight` term: cross-entropy pooled over all chosen response tokens of the
batch (`nn.CrossEntropyLoss`), which is also TRL CPO's `cpo_alpha` term. The implicit reward is β·avg_i.
TRL's CPOTrainer (`loss_type="simpo"`) takes the absolute γ = β·(γ/β) as `simpo_gamma` (§A.7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from tvkd.api import LOSSES, EvalSettings, LossOutput, Needs, PreferenceLoss, ScoredBatch, reward_metrics


@LOSSES.register(
    "simpo",
    needs="nothing beyond the student log-probs (no reference)",
    citation="Meng, Xia, Chen, 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward, "
    "NeurIPS (Eq. 6)",
    reference_free=True,
)
class SimPO(PreferenceLoss):
    """L = −log σ(β·((avg_w − avg_l) − γ/β)), avg the token-mean student log-prob (SimPO Eq. 6)."""

    name = "simpo"

    @dataclass
    class Config:
        beta: float = field(default=2.0, metadata={"help": "β, the scale of the reward β·avg log π_θ(y|x)."})
        gamma_beta_ratio: float = field(
            default=0.5, metadata={"help": "γ/β, the target reward margin divided by β (γ = β·gamma_beta_ratio)."}
        )
        sft_weight: float = field(
            default=0.0,
            metadata={"help": "Weight of the NLL on the chosen responses (token mean over the batch), added "
                              "as in the official code; 0 is pure SimPO."},
        )

        def __post_init__(self):
            if not self.beta > 0:
                raise ValueError(f"simpo: beta must be > 0, got {self.beta}")
            if not self.gamma_beta_ratio >= 0:
                raise ValueError(f"simpo: gamma_beta_ratio must be >= 0, got {self.gamma_beta_ratio}")
            if not self.sft_weight >= 0:
                raise ValueError(f"simpo: sft_weight must be >= 0, got {self.sft_weight}")

    def needs(self, cfg: Config) -> Needs:
        return Needs()

    def eval_settings(self, cfg: Config) -> EvalSettings:
        return EvalSettings(implicit_reward_beta=cfg.beta)

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        avg_w, avg_l = batch.split(batch.sequence_logps() / batch.lengths().clamp(min=1))
        logits = (avg_w - avg_l) - cfg.gamma_beta_ratio
        losses = -F.logsigmoid(cfg.beta * logits)
        loss = losses.mean()
        margin = cfg.beta * (avg_w - avg_l)  # implicit-reward margin, without γ (official rewards/margins)
        metrics = {"simpo_loss": losses.detach().mean(), "margin": margin.detach().mean()}
        if cfg.sft_weight > 0:
            logps, _ = batch.split(batch.logps)
            mask, _ = batch.split(batch.mask)
            nll = -(logps * mask).sum() / mask.sum().clamp(min=1)
            loss = loss + cfg.sft_weight * nll
            metrics["sft_loss"] = nll.detach()
        metrics["loss"] = loss.detach()
        metrics.update(reward_metrics(cfg.beta * avg_w, cfg.beta * avg_l))
        return LossOutput(loss=loss, metrics=metrics, margins=margin.detach())
