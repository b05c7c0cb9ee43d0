"""DDPO, reward-model distillation (Fisch et al., 2025, "Robust Preference Optimization through Reward Model
Distillation", TMLR; arXiv 2405.19316): regress the student's implicit-reward margin onto a target reward margin.

    L_DDPO = (β·(Δ_w − Δ_l) − (r*(y_w) − r*(y_l)))²,   Δ_i = Σ_t [log π_θ(a_t|s_t) − log π_ref(a_t|s_t)]
    r*(y)  = r_T(y) = β_T·Σ_t [log π_T(a_t|s_t) − log π_Tref(a_t|s_t)]   (`target_source=teacher`, the default)

docs/methods.md §A.5 and §B.4.7: r_T is the teacher's DPO implicit reward, read from the cached per-token `log_prob`
columns of the teacher (``{side}/log_prob``) and of its SFT model π_Tref (``{side}/tref:log_prob``). β_T
(`teacher_beta`) defaults to 0.05, the testbed teacher's DPO β (docs/testbed.md §1). `target_source=data:<key>` or
`data:<chosen_key>,<rejected_key>` reads the margin from the pair's ``meta`` instead (an RM score or a rating,
§B.4.7's "or an RM score"), unscaled. The target margin is fixed, so it is computed once per pair in `prepare` (the
column ``ddpo_target``), as TVKD's offset. The gradient is ∇L = 2·(β(Δ_w − Δ_l) − target)·β·(∇Δ_w − ∇Δ_l).

No official code exists (§A.7); the paper's pessimistic variant (a max over a reward-model ensemble) is not provided.
The reward gaps come from `tvkd.offsets` (shared with `odpo` and `tvkd`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tvkd.api import (
    LOSSES,
    EvalSettings,
    LossOutput,
    Needs,
    PreferenceLoss,
    ScoredBatch,
    reward_metrics,
)
from tvkd.offsets import data_keys, replace_column, reward_gaps, source_needs

TARGET_COLUMN = "ddpo_target"


@LOSSES.register(
    "ddpo",
    needs="reference log-probs + the teacher's and its SFT model's per-token log-probs (cached), "
    "or a reward margin in the pairs' meta",
    citation="Fisch et al., 2025, Robust Preference Optimization through Reward Model Distillation, TMLR "
    "(arXiv 2405.19316)",
    reference_free=False,
)
class DDPO(PreferenceLoss):
    """L = (β(Δ_w − Δ_l) − (r_T(y_w) − r_T(y_l)))², r_T = β_T·log π_T/π_Tref (docs/methods.md §A.5)."""

    name = "ddpo"
    identity_defaults = ("beta",)  # its default moved from 0.1 to 0.01: a config that leaves β out is a new run

    @dataclass
    class Config:
        beta: float = field(default=0.01, metadata={
            "help": "β, the scale of the student's implicit reward (0.01, as dpo: docs/methods.md §A.5)."})
        teacher_beta: float = field(
            default=0.05,
            metadata={"help": "β_T in the target r_T = β_T·Σ log π_T/π_Tref: the teacher's own DPO β (0.05 on the "
                      "testbed); teacher target only."},
        )
        target_source: str = field(
            default="teacher",
            metadata={"help": "Target margin r*(y_w) − r*(y_l): teacher (implicit reward r_T), data:<gap_key> or "
                      "data:<chosen_key>,<rejected_key> (numbers in the pairs' meta, unscaled)."},
        )

        def __post_init__(self):
            if not self.beta > 0:
                raise ValueError(f"ddpo: beta must be > 0, got {self.beta}")
            if not self.teacher_beta > 0:
                raise ValueError(f"ddpo: teacher_beta must be > 0, got {self.teacher_beta}")
            data_keys(self.target_source, "ddpo", "target_source")

    def meta_keys(self, cfg: Config) -> tuple[str, ...]:
        return data_keys(cfg.target_source, "ddpo", "target_source")

    def needs(self, cfg: Config) -> Needs:
        return Needs(reference=True, **source_needs(cfg.target_source))

    def batch_columns(self, cfg: Config) -> dict[str, str]:
        return {TARGET_COLUMN: "pair"}

    def eval_settings(self, cfg: Config) -> EvalSettings:
        teacher = cfg.target_source == "teacher"
        return EvalSettings(implicit_reward_beta=cfg.beta, offset_column=TARGET_COLUMN if teacher else None)

    def prepare(self, dataset: Any, cfg: Config, *, seed: int) -> Any:
        """Add ``ddpo_target`` = r*(y_w) − r*(y_l) per pair (`seed` is not used)."""
        gaps = reward_gaps(dataset, cfg.target_source, cfg.teacher_beta, "ddpo", "target_source")
        return replace_column(dataset, TARGET_COLUMN, gaps.tolist())

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        if TARGET_COLUMN not in batch.columns:
            raise ValueError(f"ddpo reads the per-pair column {TARGET_COLUMN!r}; run DDPO.prepare on the data set")
        chosen, rejected = batch.log_ratios()
        implicit = cfg.beta * (chosen - rejected)
        target = batch.columns[TARGET_COLUMN].to(device=implicit.device, dtype=implicit.dtype)
        residual = implicit - target
        losses = residual.square()
        metrics = {
            "loss": losses.detach().mean(),
            "margin": implicit.detach().mean(),
            "ddpo/target_mean": target.mean(),
            "ddpo/residual_abs_mean": residual.detach().abs().mean(),
        }
        metrics.update(reward_metrics(cfg.beta * chosen, cfg.beta * rejected))
        return LossOutput(loss=losses.mean(), metrics=metrics, margins=implicit.detach())
