"""ADPA (Gao et al., 2025, "Advantage-Guided Distillation for Preference Alignment in Small Language
Models", ICLR; official code gaoshiping/ADPA): the student's own greedy answer y_s, scored token by
token by the teacher's advantage over its SFT model, plus SFT on the chosen answer.

    A(s_t, a)  = log max(π_T(a|s_t), 1e-7) − log max(π_Tref(a|s_t), 1e-7)    a ∈ top-50 of π_T at s_t
                 (a outside π_Tref's top-50: the official code uses min_a' π_T(a'|s_t) for π_Tref(a))
    Ã          = clamp([A_1, ..., A_50, 0], 1e-8, 1 − 1e-8)                 (official `prob_stabilize`)
    L_ADPA     = −mean_{t ∈ y_s} Σ_{k=1}^{51} q_θ,k(s_t) · Ã_k               (q_θ: student probabilities of
                                                                           π_T's top-50 ids, then the rest)
    L          = 1.0 · CE(y_w) + 1.6 · L_ADPA                               (student_adpa.yaml)

docs/methods.md §B.3 and §A.7. y_s replaces the rejected side of each pair (`Needs.rejected_from=
"student"`: greedy rollouts of the student's initialisation, cached); the teacher's and the teacher
reference's top-k at y_s's positions come from the teacher cache. Flags restore the readings the
spec leaves open: `clamp=false` is the paper's signed advantage scaled by `beta` (no clamp);
`fallback="reference_min"` uses min π_Tref (the likely intent) instead of the official min π_T;
`importance_sampling=true` weights the advantage term by w_i = exp(log π_θ(y_s,i) − log π_ref(y_s,i)),
not detached, in the official form: the pooled token mean (over every y_s token of the batch)
times the batch mean of w_i, mean_i(L_ADPA · w_i). It is not Σ_i w_i·(token mean of sequence i)/B;
the two agree only for one pair or equal lengths. The flag then needs the reference.

The student's bins are the official ones: the fp32 softmax at π_T's top-k ids, the rest bin
1 − Σ top-k (`tvkd.losses.tvkd_released.official_bins`), every bin clamped to [1e-8, 1 − 1e-8].

The EOS position: `tvkd`'s cache holds the teacher's and the teacher reference's real top-k at the
state that predicts EOS (docs/methods.md §B.8), so by default the EOS token's advantage counts like
any other. The official cache has no entry there (§B.1.2): both bin vectors are all 0, clamped to
1e-8, so that position adds the constant (k+1)·1e-16 and still counts in the token mean. On short
answers the two differ by 2–20 % of the ADPA term. `eos_entry=false` restores the official form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tvkd.api import LOSSES, LossOutput, Needs, PreferenceLoss, ScoredBatch
from tvkd.losses.tvkd_released import official_bins

FLOOR = 1e-7
CLAMP = (1e-8, 1.0 - 1e-8)
FALLBACKS = ("teacher_min", "reference_min")


def advantages(t_ids: torch.Tensor, t_logp: torch.Tensor, r_ids: torch.Tensor, r_logp: torch.Tensor,
               fallback: str = "teacher_min") -> torch.Tensor:
    """[..., k] A(s, a) for the teacher's top-k ids a (docs/methods.md §B.3), from both top-k caches."""
    pa = t_logp.float().exp()
    pb = r_logp.float().exp()
    hit = t_ids.long().unsqueeze(-1) == r_ids.long().unsqueeze(-2)  # [..., k, k]: teacher id in tref's top-k
    pb_at = (hit.float() * pb.unsqueeze(-2)).sum(-1)
    missing = pa.min(-1, keepdim=True).values if fallback == "teacher_min" else pb.min(-1, keepdim=True).values
    pb_at = torch.where(hit.any(-1), pb_at, missing.expand_as(pb_at))
    return pa.clamp(min=FLOOR).log() - pb_at.clamp(min=FLOOR).log()


@LOSSES.register(
    "adpa",
    needs="student greedy rollouts (rejected side), teacher and teacher-reference top-k on them (cached), "
          "student logits",
    citation="Gao et al., 2025, Advantage-Guided Distillation for Preference Alignment in Small Language Models, "
             "ICLR (official code gaoshiping/ADPA, get_reverse_ce)",
    reference_free=True,
)
class ADPA(PreferenceLoss):
    """L = CE(y_w) − 1.6·mean_t Σ_k q_θ,k·clamp(A_k) on the student's own answers."""

    name = "adpa"

    @dataclass
    class Config:
        topk: int = field(default=50, metadata={"help": "Teacher (and teacher-reference) top-k per position."})
        sft_weight: float = field(default=1.0, metadata={"help": "Weight of the CE on the chosen answer."})
        adpa_weight: float = field(default=1.6, metadata={"help": "Weight of the advantage term (official 1.6)."})
        clamp: bool = field(default=True, metadata={
            "help": "Official: advantages clamped to [1e-8, 1−1e-8] with a 0 for the rest bin; false: the "
                    "paper's signed advantage times beta over the top-k only."})
        beta: float = field(default=1.0, metadata={"help": "Scale of the signed advantage when clamp=false."})
        fallback: str = field(default="teacher_min", metadata={
            "help": "π_Tref of an id outside its top-k: teacher_min (official: min of π_T's top-k) | "
                    "reference_min (min of π_Tref's top-k)."})
        importance_sampling: bool = field(default=False, metadata={
            "help": "Official flag: the pooled advantage term times mean_i exp(log π_θ(y_s,i) − log π_ref(y_s,i)) "
                    "(not detached; needs the reference)."})
        eos_entry: bool = field(default=True, metadata={
            "help": "true: the teacher's real top-k at the EOS position counts (tvkd's cache has it); false: the "
                    "official cache has no EOS entry, so EOS adds the constant (k+1)·1e-16 and still counts in the "
                    "token mean."})
        max_new_tokens: int = field(default=512, metadata={"help": "Length budget of the student's rollouts."})

        def __post_init__(self):
            if not (isinstance(self.topk, int) and self.topk >= 1):
                raise ValueError(f"adpa: topk must be a positive int, got {self.topk!r}")
            if self.fallback not in FALLBACKS:
                raise ValueError(f"adpa: fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")
            if self.sft_weight < 0 or self.adpa_weight < 0:
                raise ValueError("adpa: sft_weight and adpa_weight must be >= 0")
            if self.max_new_tokens < 1:
                raise ValueError(f"adpa: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def needs(self, cfg: Config) -> Needs:
        return Needs(reference=cfg.importance_sampling, topk=cfg.topk, teacher_reference_topk=cfg.topk,
                     student_logits=True, rejected_from="student", rollout_max_new_tokens=cfg.max_new_tokens)

    def batch_columns(self, cfg: Config) -> dict[str, str]:
        return {"topk_ids": "topk", "topk_logprobs": "topk", "tref:topk_ids": "topk", "tref:topk_logprobs": "topk"}

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        if batch.logits is None:
            raise ValueError("adpa needs the student logits (Needs.student_logits)")
        cols = batch.columns
        _, ids = batch.split(cols["topk_ids"])
        _, t_logp = batch.split(cols["topk_logprobs"])
        _, r_ids = batch.split(cols["tref:topk_ids"])
        _, r_logp = batch.split(cols["tref:topk_logprobs"])
        _, z = batch.split(batch.logits)
        _, mask = batch.split(batch.mask)
        adv = advantages(ids, t_logp, r_ids, r_logp, cfg.fallback)  # [B, T, k]
        if cfg.clamp:
            # official: the student's k+1 bins and [A_1..A_k, 0] both clamped to [1e-8, 1 − 1e-8]
            q = official_bins(z, ids).clamp(*CLAMP)
            target = torch.cat([adv, torch.zeros_like(adv[..., :1])], dim=-1).clamp(*CLAMP)
            per_token = (q * target).sum(-1)
            empty = (ids.shape[-1] + 1) * CLAMP[0] * CLAMP[0]  # an official position without a cache entry
        else:
            q_top = torch.softmax(z.float(), -1).gather(-1, ids.long())  # student probabilities of the top-k ids
            per_token = cfg.beta * (q_top * adv).sum(-1)
            empty = 0.0
        if not cfg.eos_entry:
            lengths = mask.sum(-1, keepdim=True)
            eos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) == lengths - 1
            per_token = torch.where(eos & mask, torch.full_like(per_token, empty), per_token)
        m = mask.float()
        adpa_term = -(per_token * m).sum() / m.sum().clamp(min=1)
        metrics = {}
        if cfg.importance_sampling:
            _, delta = batch.log_ratios(include_reference=True)
            weight = delta.exp()  # not detached, as the official flag
            adpa_term = (adpa_term * weight).mean()  # official: the pooled term times each weight, then the mean
            metrics["importance_weight"] = weight.detach().mean()
        logps_w, _ = batch.split(batch.logps)
        mask_w, _ = batch.split(batch.mask)
        ce = -(logps_w * mask_w).sum() / mask_w.sum().clamp(min=1)
        loss = cfg.sft_weight * ce + cfg.adpa_weight * adpa_term
        metrics.update({"loss": loss.detach(), "ce": ce.detach(), "adpa": adpa_term.detach()})
        metrics["advantage_mean"] = (adv.mean(-1) * m).sum().detach() / m.sum().clamp(min=1)
        return LossOutput(loss=loss, metrics=metrics)
