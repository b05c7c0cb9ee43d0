"""SFT on the chosen responses: the token-mean negative log-likelihood.

    L_SFT = −(1 / Σ_i T_i) · Σ_i Σ_{t < T_i} log π_θ(a_t^{w,i} | s_t)      (chosen responses only, EOS included)

The mean is over all chosen tokens of the batch pooled (as TRL's SFTTrainer and the DCKD/ADPA
cross-entropy term), not a mean of per-sequence means; rejected responses are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvkd.api import LOSSES, LossOutput, Needs, PreferenceLoss, ScoredBatch


@LOSSES.register(
    "sft",
    needs="nothing beyond the student log-probs",
    citation="maximum-likelihood fine-tuning on the chosen responses (the usual SFT baseline)",
    reference_free=True,
)
class SFT(PreferenceLoss):
    """L = −mean over chosen response tokens of log π_θ(a_t|s_t)."""

    name = "sft"

    @dataclass
    class Config:
        """SFT has no options."""

    def needs(self, cfg: Config) -> Needs:
        return Needs()

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        logps, _ = batch.split(batch.logps)
        mask, _ = batch.split(batch.mask)
        count = mask.sum().clamp(min=1)
        loss = -(logps * mask).sum() / count
        return LossOutput(
            loss=loss,
            metrics={"loss": loss.detach(), "nll": loss.detach(), "tokens": mask.sum().float()},
        )
