"""WPO (Zhou et al., 2024): DPO with each pair weighted by how on-policy it is (docs/methods.md §A.5, §B.4.3).

The paper's Eq. 2 with the "sampled alignment" weight of the official code
(`wzhouad/WPO scripts/run_wpo.py::WPOTrainer.get_batch_logps`):

    w(y)   = exp( (1/T) Σ_t [log π_θ(a_t|s_t) − log Σ_v π_θ(v|s_t)²] )       (no gradient)
    weight = min(1, w(y_w)·w(y_l))
    L      = weight · (−log σ(β(Δ_w − Δ_l))),   Δ_i = Σ_t [log π_θ − log π_ref](a_t|s_t),   mean over pairs

The weight is detached, as the official `.detach()` (§A.7). `clamp=false` drops the min(1, ·), which is what
current TRL's `use_weighting=True` computes. log Σ_v π² = logsumexp(2z) − 2·logsumexp(z) in fp32 (TRL's form;
the official code takes log((softmax(z)²).sum()) in the model's dtype).

The student's log-probs are recomputed from `batch.logits` by `tvkd.scoring.token_logps` (the operation that
fills `batch.logps`), so the gradient reaches the student through the logits this loss declares.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tvkd.api import LOSSES, EvalSettings, LossOutput, Needs, PreferenceLoss, ScoredBatch, reward_metrics
from tvkd.scoring import token_logps


def sequence_weights(logits: torch.Tensor, logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[rows] w(y) = exp(mean_t [log π_θ(a_t|s_t) − log Σ_v π_θ(v|s_t)²]), without gradient."""
    with torch.no_grad():
        z = logits.float()
        log_sum_sq = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
        aligned = ((logps - log_sum_sq) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return aligned.exp()


def student_logps(batch: ScoredBatch) -> torch.Tensor:
    """[2B, T] log π_θ(a_t|s_t) from the student logits, differentiable (0 where ~mask)."""
    if batch.logits is None:
        raise ValueError("wpo needs the student logits (Needs.student_logits)")
    if batch.token_ids is None:
        raise ValueError("wpo needs the response token ids (ScoredBatch.token_ids)")
    return token_logps(batch.logits, batch.token_ids, batch.mask)


def pair_weights(batch: ScoredBatch, clamp: bool = True, logps: torch.Tensor | None = None) -> torch.Tensor:
    """[B] w(y_w)·w(y_l), clamped at 1 when `clamp` (official WPO); detached."""
    logps = student_logps(batch) if logps is None else logps
    w_chosen, w_rejected = batch.split(sequence_weights(batch.logits, logps.detach(), batch.mask))
    weight = w_chosen * w_rejected
    return weight.clamp(max=1.0) if clamp else weight


@LOSSES.register(
    "wpo",
    needs="reference log-probs + student logits (for Σ_v π_θ(v|s_t)²)",
    citation="Zhou et al., 2024, WPO: Enhancing RLHF with Weighted Preference Optimization, EMNLP (Eq. 2; "
    "the sampled-alignment weight of the official code)",
    reference_free=False,
)
class WPO(PreferenceLoss):
    """L = min(1, w(y_w)·w(y_l)) · (−log σ(β(Δ_w − Δ_l))), w the detached length-normalised alignment weight."""

    name = "wpo"
    identity_defaults = ("beta",)  # its default moved from 0.1 to 0.01: a config that leaves β out is a new run

    @dataclass
    class Config:
        beta: float = field(default=0.01, metadata={
            "help": "β, the KL-penalty scale of the DPO implicit reward (0.01: the official Llama-3 config and "
                    "TVKD's wpo.yaml, docs/methods.md §A.5)."})
        clamp: bool = field(
            default=True,
            metadata={"help": "Clamp the pair weight w(y_w)·w(y_l) at 1 (official WPO); false: no clamp, as "
                              "current TRL's use_weighting."},
        )

        def __post_init__(self):
            if not self.beta > 0:
                raise ValueError(f"wpo: beta must be > 0, got {self.beta}")

    def needs(self, cfg: Config) -> Needs:
        return Needs(reference=True, student_logits=True)

    def eval_settings(self, cfg: Config) -> EvalSettings:
        return EvalSettings(implicit_reward_beta=cfg.beta)

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        logps = student_logps(batch)
        weight = pair_weights(batch, cfg.clamp, logps)
        chosen, rejected = dataclasses.replace(batch, logps=logps).log_ratios()
        margin = cfg.beta * (chosen - rejected)
        losses = weight * -F.logsigmoid(margin)
        metrics = {
            "loss": losses.detach().mean(),
            "margin": margin.detach().mean(),
            "wpo/weight_mean": weight.mean(),
            "wpo/weight_min": weight.min(),
        }
        metrics.update(reward_metrics(cfg.beta * chosen, cfg.beta * rejected))
        return LossOutput(loss=losses.mean(), metrics=metrics, margins=margin.detach())
