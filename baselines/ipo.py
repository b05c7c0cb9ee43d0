"""IPO (Azar et al., 2023), in TRL's length-averaged form (docs/methods.md §A.5, §B.4.1).

The paper's Eq. 17, with τ written β:

    L_IPO = (h − 1/(2β))²,   h = Δ_w − Δ_l,   Δ_i = Σ_t [log π_θ(a_t|s_t) − log π_ref(a_t|s_t)]

TRL (`loss_type="ipo"`) averages each log-ratio over its response tokens, Δ̄_i = Δ_i / T_i, a choice its
authors confirmed with the IPO authors (the paper's results use it):

    L = (Δ̄_w − Δ̄_l − 1/(2β))²,   mean over pairs

`length_normalize=False` gives the paper's sequence-sum form. There is no official IPO code; TRL is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvkd.api import LOSSES, EvalSettings, LossOutput, Needs, PreferenceLoss, ScoredBatch, reward_metrics


@LOSSES.register(
    "ipo",
    needs="reference log-probs",
    citation="Azar et al., 2023, A General Theoretical Paradigm to Understand Learning from Human "
    "Preferences, AISTATS 2024 (Eq. 17); length-averaged as TRL's loss_type='ipo'",
    reference_free=False,
)
class IPO(PreferenceLoss):
    """L = (Δ̄_w − Δ̄_l − 1/(2β))², Δ̄ the token-mean log-ratio to π_ref (IPO Eq. 17 as in TRL)."""

    name = "ipo"

    @dataclass
    class Config:
        beta: float = field(
            default=0.1, metadata={"help": "β (the paper's τ): the loss pulls Δ̄_w − Δ̄_l towards 1/(2β)."}
        )
        length_normalize: bool = field(
            default=True,
            metadata={"help": "Average each log-ratio over its response tokens (TRL, default); false: the paper's "
                              "Eq. 17 on sequence sums Δ_w − Δ_l."},
        )

        def __post_init__(self):
            if not self.beta > 0:
                raise ValueError(f"ipo: beta must be > 0, got {self.beta}")

    def needs(self, cfg: Config) -> Needs:
        return Needs(reference=True)

    def eval_settings(self, cfg: Config) -> EvalSettings:
        return EvalSettings(implicit_reward_beta=cfg.beta)

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        chosen, rejected = batch.log_ratios()
        if cfg.length_normalize:
            len_w, len_l = batch.split(batch.lengths().clamp(min=1))
            h = chosen / len_w - rejected / len_l
        else:
            h = chosen - rejected
        losses = (h - 1 / (2 * cfg.beta)) ** 2
        margin = cfg.beta * (chosen - rejected)  # the DPO-style implicit-reward margin (Table 5)
        metrics = {"loss": losses.detach().mean(), "margin": margin.detach().mean(), "ipo/h": h.detach().mean()}
        metrics.update(reward_metrics(cfg.beta * chosen, cfg.beta * rejected))
        return LossOutput(loss=losses.mean(), metrics=metrics, margins=margin.detach())
