"""GKD (Agarwal et al., 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", ICLR): the generalized Jensen–Shannon divergence between teacher and student, token by token,
on the data's responses or, with probability λ, on the student's own samples.

    m      = β·p_T + (1 − β)·q_θ                                  (per position, in log space)
    JSD_β  = β·KL(p_T ‖ m) + (1 − β)·KL(q_θ ‖ m)                  (β = 0: KL(p_T ‖ q_θ); β = 1: KL(q_θ ‖ p_T))
    L      = Σ_{valid t} JSD_β(s_t) / #valid t                     (response tokens of the chosen side)

docs/methods.md §B.5.3, §A.7. As TRL's `GKDTrainer` (`trl.experimental.gkd`, whose
`generalized_jsd_loss` this equals to 1e-5, tested): with probability λ = 0.5 a batch's responses
are replaced by samples of the current student (temperature 0.9, cut after the first end-of-turn
token, `Needs.on_policy`); the loss itself is computed at temperature 1 (the 0.9 is only the
sampling temperature); the teacher's full distribution is read online at every step
(`Needs.teacher_logits`: on-policy samples cannot be cached). Where the two vocabularies differ by
padding rows, both distributions are taken over the shared rows. TRL's `seq_kd` (teacher samples
when not on-policy) is a different method and not offered; SeqKD is `seqkd`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tvkd.api import LOSSES, LossOutput, Needs, OnPolicy, PreferenceLoss, ScoredBatch


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """[...] JSD_β per position from logits [..., V] (fp32; the GKD paper's Eq. 1)."""
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), 0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


@LOSSES.register(
    "gkd",
    needs="student logits, online teacher logits, on-policy student samples inside training; no reference",
    citation="Agarwal et al., 2024, On-Policy Distillation of Language Models: Learning from Self-Generated "
             "Mistakes, ICLR (TRL trl.experimental.gkd)",
    reference_free=True,
)
class GKD(PreferenceLoss):
    """L = token mean of JSD_β(p_T ‖ q_θ) on the chosen side (data or on-policy samples)."""

    name = "gkd"

    @dataclass
    class Config:
        lmbda: float = field(default=0.5, metadata={"help": "λ: probability that a batch is the student's own "
                                                            "samples (1: fully on-policy, 0: the data only)."})
        beta: float = field(default=0.5, metadata={"help": "β of the generalized JSD (0: forward KL, 1: reverse)."})
        temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of the on-policy samples."})
        max_new_tokens: int = field(default=128, metadata={"help": "Length budget of the on-policy samples."})

        def __post_init__(self):
            if not 0 <= self.lmbda <= 1:
                raise ValueError(f"gkd: lmbda must lie in [0, 1], got {self.lmbda}")
            if not 0 <= self.beta <= 1:
                raise ValueError(f"gkd: beta must lie in [0, 1], got {self.beta}")
            if not self.temperature > 0:
                raise ValueError(f"gkd: temperature must be > 0, got {self.temperature}")
            if self.max_new_tokens < 1:
                raise ValueError(f"gkd: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def needs(self, cfg: Config) -> Needs:
        return Needs(student_logits=True, teacher_logits=True,
                     on_policy=OnPolicy(cfg.lmbda, cfg.temperature, cfg.max_new_tokens) if cfg.lmbda > 0 else None)

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        if batch.logits is None or batch.teacher_logits is None:
            raise ValueError("gkd needs the student logits and the teacher logits (Needs.teacher_logits)")
        z, _ = batch.split(batch.logits)
        zt, _ = batch.split(batch.teacher_logits)
        mask, _ = batch.split(batch.mask)
        v = min(z.shape[-1], zt.shape[-1])  # shared rows when one embedding matrix is padded
        jsd = generalized_jsd(z[..., :v], zt[..., :v], cfg.beta)
        m = mask.float()
        loss = (jsd * m).sum() / m.sum().clamp(min=1)
        return LossOutput(loss=loss, metrics={"loss": loss.detach(), "jsd": loss.detach()})
