"""DCKD, Dual-Constrained Knowledge Distillation (Gao et al., ICLR 2025), official form (docs/methods.md §B.2).

    L    = sft_weight · CE(y_w) + chosen_kl_weight · KL_w + rejected_kl_weight · KL_l [+ dpo_weight · L_DPO]
    KL_i = (1 / N_i) Σ_{valid t of responses i} Σ_{k=1}^{51} p_T,k · (log p_T,k − log max(q_θ,k, 1e-7))
    CE   = −(1 / N_w) Σ_{valid chosen t} log π_θ(a_t | s_t)

KL_i is the forward KL(teacher‖student) on the 51-bin projection (teacher top-50 + rest,
`baselines._binned`), pooled over the N_i valid tokens of the chosen (i = w) or rejected (i = l)
responses of the batch, EOS included; CE is `baselines.sft`'s token mean. Defaults are the
official ``student_dckd.yaml``: sft_on_chosen 1, distillation_weight 1, chosen/rejected_distil_weight
0.1, dpo_weight 0. ``dpo_weight > 0`` adds TRL's sigmoid DPO, −log σ(β(Δ_w − Δ_l)) averaged over
pairs, which needs π_ref (declared only then); β defaults to the YAML's 0.01, unused at dpo_weight 0.

Differences from the official code (gaoshiping/ADPA, ``get_kl_loss`` + ``load_input_and_target_probs_fast``):
the student's rest bin is exact by default (``rest_bin=complement`` restores 1 − Σ top-k); the
teacher bins are not clamped to [1e-8, 1 − 1e-8] (under 1e-6 nats per clamped bin); the official
cache has no EOS entry, so its EOS KL is a constant ≈ −1e-6, while `tvkd`'s cache holds the teacher
at EOS and that KL counts (no flag); CE is fp32 (the official takes it on bf16 logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from baselines import _binned
from tvkd.api import LOSSES, EvalSettings, LossOutput, Needs, PreferenceLoss, ScoredBatch, reward_metrics


@LOSSES.register(
    "dckd",
    needs="student logits + teacher top-k (k=50) on chosen and rejected (topk=null: online teacher logits); "
          "reference log-probs only when dpo_weight > 0",
    citation="Gao et al., 2025, Advantage-Guided Distillation for Preference Alignment in Small Language "
             "Models, ICLR (arXiv 2502.17927; DCKD); official code gaoshiping/ADPA, scripts/run_distill_dpo.py, "
             "student_dckd.yaml",
    reference_free=True,
)
class DCKD(PreferenceLoss):
    """L = CE(y_w) + 0.1·KL_w + 0.1·KL_l (51-bin forward KL), optionally + dpo_weight·DPO."""

    name = "dckd"

    @dataclass
    class Config:
        sft_weight: float = field(default=1.0, metadata={"help": "Weight of the chosen-response CE (sft_on_chosen)."})
        chosen_kl_weight: float = field(default=0.1, metadata={
            "help": "Weight of KL_w, the 51-bin forward KL on the chosen responses (chosen_distil_weight)."})
        rejected_kl_weight: float = field(default=0.1, metadata={
            "help": "Weight of KL_l, the 51-bin forward KL on the rejected responses (rejected_distil_weight)."})
        topk: int | None = _binned.topk_field()
        rest_bin: str = _binned.rest_bin_field()
        prob_floor: float = _binned.floor_field()
        dpo_weight: float = field(default=0.0, metadata={
            "help": "Weight of an added DPO term −log σ(β(Δ_w − Δ_l)) (official 0); > 0 needs the reference."})
        beta: float = field(default=0.01, metadata={"help": "β of the DPO term (the official YAML's 0.01); "
                                                            "used only when dpo_weight > 0."})

        def __post_init__(self):
            for key in ("sft_weight", "chosen_kl_weight", "rejected_kl_weight", "dpo_weight"):
                if getattr(self, key) < 0:
                    raise ValueError(f"dckd: {key} must be >= 0, got {getattr(self, key)}")
            if not self.beta > 0:
                raise ValueError(f"dckd: beta must be > 0, got {self.beta}")
            _binned.check_options("dckd", self.topk, self.rest_bin, self.prob_floor)

    def needs(self, cfg: Config) -> Needs:
        kd = _binned.needs(cfg.topk)
        return Needs(reference=cfg.dpo_weight > 0, topk=kd.topk, student_logits=True, teacher_logits=kd.teacher_logits)

    def batch_columns(self, cfg: Config) -> dict[str, str]:
        return _binned.batch_columns(cfg.topk)

    def eval_settings(self, cfg: Config) -> EvalSettings:
        return EvalSettings(implicit_reward_beta=cfg.beta) if cfg.dpo_weight > 0 else EvalSettings()

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        b = batch.num_pairs
        mask_w, mask_l = batch.split(batch.mask)
        ce = -_binned.token_mean(batch.logps[:b], mask_w)
        kl = _binned.forward_kl(batch, slice(None), cfg.topk, cfg.rest_bin, cfg.prob_floor, self.name)
        kl_w, kl_l = _binned.token_mean(kl[:b], mask_w), _binned.token_mean(kl[b:], mask_l)
        loss = cfg.sft_weight * ce + cfg.chosen_kl_weight * kl_w + cfg.rejected_kl_weight * kl_l
        metrics = {"nll": ce.detach(), "kl/chosen": kl_w.detach(), "kl/rejected": kl_l.detach()}
        margins = None
        if cfg.dpo_weight > 0:
            chosen, rejected = batch.log_ratios(include_reference=True)
            margin = cfg.beta * (chosen - rejected)
            dpo = -F.logsigmoid(margin).mean()
            loss = loss + cfg.dpo_weight * dpo
            margins = margin.detach()
            metrics.update({"dpo": dpo.detach(), "margin": margins.mean()})
            metrics.update(reward_metrics(cfg.beta * chosen, cfg.beta * rejected))
        metrics["loss"] = loss.detach()
        return LossOutput(loss=loss, metrics=metrics, margins=margins)
