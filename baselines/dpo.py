"""DPO (Rafailov et al., 2023), with cDPO label smoothing (Mitchell, 2023).

    L_DPO = −log σ(β·(Δ_w − Δ_l)),   Δ_i = Σ_t [log π_θ(a_t|s_t) − log π_ref(a_t|s_t)]   (DPO paper, Eq. 7)

cDPO (docs/methods.md §A.7; TRL 0.12 semantics, which current TRL's `sigmoid` no longer applies):

    L = (1 − ε)·(−log σ(β·h)) − ε·log σ(−β·h),   h = Δ_w − Δ_l

`reference_free=True` drops π_ref (Δ_i = Σ_t log π_θ), as TRL's `reference_free`.

β defaults to 0.01, the value docs/methods.md §B.4.1 gives (the TVKD and ADPA recipes), not TRL's 0.1;
`wpo`, `odpo` and `ddpo` share it (§A.5). The testbed studies state their β (0.1) in their YAMLs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from tvkd.api import LOSSES, EvalSettings, LossOutput, Needs, PreferenceLoss, ScoredBatch, reward_metrics


@LOSSES.register(
    "dpo",
    needs="reference log-probs (unless reference_free)",
    citation="Rafailov et al., 2023, Direct Preference Optimization, NeurIPS (Eq. 7); cDPO: Mitchell, 2023",
    reference_free=False,
)
class DPO(PreferenceLoss):
    """L = −log σ(β(Δ_w − Δ_l)) (DPO Eq. 7), optionally label-smoothed as cDPO."""

    name = "dpo"
    identity_defaults = ("beta",)  # its default moved from 0.1 to 0.01: a config that leaves β out is a new run

    @dataclass
    class Config:
        beta: float = field(default=0.01, metadata={
            "help": "β, the KL-penalty scale of the implicit reward (0.01: the TVKD and ADPA recipes, "
                    "docs/methods.md §A.5; TRL's default is 0.1)."})
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

    def eval_settings(self, cfg: Config) -> EvalSettings:
        return EvalSettings(implicit_reward_beta=cfg.beta)

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        chosen, rejected = batch.log_ratios(include_reference=not cfg.reference_free)
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
