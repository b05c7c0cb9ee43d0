"""TDPO, token-level DPO (Zeng, Liu, Ma, Yang, Zhang, Wang, 2024, "Token-level Direct Preference Optimization",
ICML; arXiv 2404.11999), as the official `tdpo_loss` (`Vance0124/Token-level-Direct-Preference-Optimization`,
`trainers.py`), docs/methods.md §B.4.4 and §A.7:

    SeqKL(y) = Σ_t KL(π_ref(·|s_t) ‖ π_θ(·|s_t))                    (response tokens, full distributions)
    TDPO1 (`variant=1`): z = (Δ_w − Δ_l) − (SeqKL(y_l) − SeqKL(y_w))
    TDPO2 (`variant=2`): z = (Δ_w − Δ_l) − α·(SeqKL(y_l) − sg[SeqKL(y_w)])     (sg: stop-gradient)
    L = −log σ(β·z),   Δ_i = Σ_t [log π_θ(a_t|s_t) − log π_ref(a_t|s_t)]

Defaults β 0.1, α 0.5 (α is used by TDPO2 only, as in the official code); `variant=1` is the default at the paper's low
learning rate (§A.7; the README recommends TDPO2 at higher ones). The KL needs π_ref's full distribution at every
response state, so the reference logits are computed online at every step (`Needs.reference_logits`): a cache would
hold T·V floats per response. Both log-softmaxes run in fp32 (float64 inputs stay float64); padding is masked.

Logged `reward_accuracy` and `LossOutput.margins` use the implicit reward β·Δ (as every DPO-family loss here);
the official code's reward β·(Δ + SeqKL) is logged as ``tdpo/value_accuracy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tvkd.api import LOSSES, EvalSettings, LossOutput, Needs, PreferenceLoss, ScoredBatch, reward_metrics

VARIANTS = (1, 2)


def sequence_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[2B] Σ_t KL(π_ref(·|s_t) ‖ π_θ(·|s_t)) over the tokens `mask` marks."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"tdpo: reference logits {tuple(ref_logits.shape)} and student logits "
                         f"{tuple(logits.shape)} differ in shape (the two models must share a vocabulary)")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = F.log_softmax(logits.to(dtype), dim=-1)
    ref_logp = F.log_softmax(ref_logits.to(device=logits.device, dtype=dtype), dim=-1)
    per_token = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return per_token.masked_fill(~mask, 0.0).sum(-1)


@LOSSES.register(
    "tdpo",
    needs="reference log-probs (cached) + full reference and student logits at every step (online)",
    citation="Zeng et al., 2024, Token-level Direct Preference Optimization, ICML (arXiv 2404.11999); official code "
    "Vance0124/Token-level-Direct-Preference-Optimization",
    reference_free=False,
)
class TDPO(PreferenceLoss):
    """L = −log σ(β[(Δ_w − Δ_l) − (SeqKL(y_l) − SeqKL(y_w))]) (TDPO1; TDPO2 weights and stops the chosen KL)."""

    name = "tdpo"

    @dataclass
    class Config:
        beta: float = field(default=0.1, metadata={"help": "β, the scale of the token-level implicit reward."})
        alpha: float = field(
            default=0.5, metadata={"help": "α, the weight of the sequential-KL term (variant 2 only)."}
        )
        variant: int = field(
            default=1,
            metadata={"help": "1: TDPO1, z = (Δ_w − Δ_l) − (SeqKL_l − SeqKL_w); 2: TDPO2, "
                      "z = (Δ_w − Δ_l) − α(SeqKL_l − sg[SeqKL_w])."},
        )

        def __post_init__(self):
            if not self.beta > 0:
                raise ValueError(f"tdpo: beta must be > 0, got {self.beta}")
            if not self.alpha >= 0:
                raise ValueError(f"tdpo: alpha must be >= 0, got {self.alpha}")
            if self.variant not in VARIANTS:
                raise ValueError(f"tdpo: variant must be 1 (TDPO1) or 2 (TDPO2), got {self.variant!r}")

    def needs(self, cfg: Config) -> Needs:
        return Needs(reference=True, reference_logits=True, student_logits=True)

    def eval_settings(self, cfg: Config) -> EvalSettings:
        return EvalSettings(implicit_reward_beta=cfg.beta)

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        chosen, rejected = batch.log_ratios()
        if batch.logits is None:
            raise ValueError("tdpo needs the student logits but the batch has none (Needs.student_logits)")
        if batch.ref_logits is None:
            raise ValueError("tdpo needs the full reference logits but the batch has none (Needs.reference_logits)")
        kl_w, kl_l = batch.split(sequence_kl(batch.logits, batch.ref_logits, batch.mask))
        h = chosen - rejected
        if cfg.variant == 1:
            z = h - (kl_l - kl_w)
        else:
            z = h - cfg.alpha * (kl_l - kl_w.detach())
        z = z.to(h.dtype)
        losses = -F.logsigmoid(cfg.beta * z)
        values = cfg.beta * (chosen + kl_w), cfg.beta * (rejected + kl_l)  # the official code's rewards
        metrics = {
            "loss": losses.detach().mean(),
            "margin": (cfg.beta * z).detach().mean(),
            "tdpo/seqkl_chosen": kl_w.detach().mean(),
            "tdpo/seqkl_rejected": kl_l.detach().mean(),
            "tdpo/value_accuracy": (values[0] > values[1]).float().mean(),
        }
        metrics.update(reward_metrics(cfg.beta * chosen, cfg.beta * rejected))
        return LossOutput(loss=losses.mean(), metrics=metrics, margins=(cfg.beta * h).detach())
