"""VanillaKD: word-level forward KL to the teacher on the chosen responses (docs/methods.md §A.5, §B.5.1).

    L = w · KL_w,   KL_w = (1 / N_w) Σ_{valid chosen t} Σ_k p_T,k(s_t) · (log p_T,k(s_t) − log max(q_θ,k(s_t), 1e-7))

on the 51-bin projection (the teacher's top-50 ids + the rest, `baselines._binned`), pooled over
the N_w valid chosen tokens of the batch (EOS included), w = 0.1. No SFT, no DPO, no reference;
rejected responses are ignored. This is the TVKD repository's ``vanilakd.yaml`` (sft_on_chosen 0,
dpo_weight 0, chosen_distil_weight 0.1, rejected_distil_weight 0), i.e. DCKD's ``get_kl_loss``
on the chosen half only (Hinton et al., 2015, with the top-k "context distillation" cache).

Differences from the official code: the student's rest bin is exact by default
(``rest_bin=complement`` restores the official 1 − Σ top-k); the teacher bins are not clamped to
[1e-8, 1 − 1e-8] (under 1e-6 nats per clamped bin); the official cache has no entry at the EOS
position, so there its KL is a constant ≈ −1e-6, while `tvkd`'s cache holds the teacher's real
distribution at EOS (docs/methods.md §B.8) and its KL counts (no flag restores the constant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from baselines import _binned
from tvkd.api import LOSSES, LossOutput, Needs, PreferenceLoss, ScoredBatch


@LOSSES.register(
    "vanilla_kd",
    needs="student logits + teacher top-k (k=50) on the chosen responses (topk=null: online teacher logits); "
          "no reference",
    citation="Hinton et al., 2015, Distilling the Knowledge in a Neural Network; TVKD official recipe "
             "recipes/llama3.2-1b-deita-dpomix/vanilakd.yaml with get_kl_loss (scripts/run_distill_dpo.py)",
    reference_free=True,
)
class VanillaKD(PreferenceLoss):
    """L = weight · mean over valid chosen tokens of KL(p_T ‖ q_θ) on the 51-bin projection."""

    name = "vanilla_kd"

    @dataclass
    class Config:
        weight: float = field(default=0.1, metadata={"help": "w, the weight of the chosen-response KL "
                                                             "(chosen_distil_weight; official 0.1)."})
        topk: int | None = _binned.topk_field()
        rest_bin: str = _binned.rest_bin_field()
        prob_floor: float = _binned.floor_field()

        def __post_init__(self):
            if not self.weight > 0:
                raise ValueError(f"vanilla_kd: weight must be > 0, got {self.weight}")
            _binned.check_options("vanilla_kd", self.topk, self.rest_bin, self.prob_floor)

    def needs(self, cfg: Config) -> Needs:
        return _binned.needs(cfg.topk)

    def batch_columns(self, cfg: Config) -> dict[str, str]:
        return _binned.batch_columns(cfg.topk)

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        chosen = slice(0, batch.num_pairs)
        kl = _binned.forward_kl(batch, chosen, cfg.topk, cfg.rest_bin, cfg.prob_floor, self.name)
        mask = batch.mask[chosen]
        kl_w = _binned.token_mean(kl, mask)
        loss = cfg.weight * kl_w
        metrics = {"loss": loss.detach(), "kl/chosen": kl_w.detach(), "tokens": mask.sum().float()}
        return LossOutput(loss=loss, metrics=metrics)
