"""ODPO, DPO with an offset (Amini, Vieira, Cotterell, 2024, "Direct Preference Optimization with an Offset",
Findings of ACL; arXiv 2402.10571), in the form of the official code (`rycolab/odpo`, `trainers.py::preference_loss`
with ``offset=True``), docs/methods.md §A.7 (which wins over §B.4.6):

    L = −log σ(β·(Δ_w − Δ_l) − α·log(r_w − r_l)),   Δ_i = Σ_t [log π_θ(a_t|s_t) − log π_ref(a_t|s_t)]

α defaults to 1.0 (the official `config/loss/odpo.yaml`); the offset α·log(r_w − r_l) is not scaled by β. The scores
r come from `offset_source`:
- ``teacher``: the teacher's implicit reward r_T(y) = β_T·Σ_t (log π_T − log π_Tref)(a_t|s_t), from the cached
  `log_prob` columns of the teacher and of its SFT model (as `ddpo`; β_T = `teacher_beta`, 0.05 by default);
- ``data:<gap_key>``: r_w − r_l read from the pair's ``meta`` (e.g. ``data:helpfulness_gap`` on HelpSteer2);
- ``data:<chosen_key>,<rejected_key>``: r_w − r_l = meta[chosen_key] − meta[rejected_key] (e.g.
  ``data:oracle_chosen,oracle_rejected`` on the testbed).

log(r_w − r_l) is undefined when r_w ≤ r_l (the official code returns NaN there). By default such pairs get weight 0:
the loss is the mean over the remaining pairs of the batch, `prepare` logs how many were dropped and the metric
``odpo/dropped_fraction`` counts them per batch. With `min_gap` > 0 every gap is floored at min_gap instead and every
pair trains. `prepare` adds the per-pair columns ``odpo_gap`` (r_w − r_l, raw), ``odpo_offset`` (log of the used gap,
0 for a dropped pair) and ``odpo_weight`` (1 or 0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn.functional as F

from tvkd.api import LOSSES, EvalSettings, LossOutput, Needs, PreferenceLoss, ScoredBatch, reward_metrics
from tvkd.offsets import data_keys, replace_column, reward_gaps, source_needs

log = logging.getLogger(__name__)

GAP_COLUMN, OFFSET_COLUMN, WEIGHT_COLUMN = "odpo_gap", "odpo_offset", "odpo_weight"


def gap_offsets(gaps: np.ndarray, min_gap: float) -> tuple[np.ndarray, np.ndarray]:
    """(log of the used gap, weight) per pair: non-positive gaps dropped (weight 0), or all floored at min_gap."""
    if min_gap > 0:
        return np.log(np.maximum(gaps, min_gap)), np.ones_like(gaps)
    valid = gaps > 0
    return np.log(np.where(valid, gaps, 1.0)), valid.astype(np.float64)


@LOSSES.register(
    "odpo",
    needs="reference log-probs + (offset_source=teacher) the teacher's and its SFT model's per-token log-probs "
    "(cached), or (data:...) scores in the pairs' meta",
    citation="Amini, Vieira, Cotterell, 2024, Direct Preference Optimization with an Offset, Findings of ACL "
    "(arXiv 2402.10571); official code rycolab/odpo",
    reference_free=False,
)
class ODPO(PreferenceLoss):
    """L = −log σ(β(Δ_w − Δ_l) − α·log(r_w − r_l)) (docs/methods.md §A.7)."""

    name = "odpo"
    identity_defaults = ("beta",)  # its default moved from 0.1 to 0.01: a config that leaves β out is a new run

    @dataclass
    class Config:
        beta: float = field(default=0.01, metadata={
            "help": "β, the DPO scale of the implicit reward (0.01, as dpo: docs/methods.md §A.5)."})
        alpha: float = field(
            default=1.0, metadata={"help": "α, the weight of the offset log(r_w − r_l) (not scaled by β); 0 is DPO."}
        )
        offset_source: str = field(
            default="teacher",
            metadata={"help": "Scores r: teacher (implicit reward β_T·Σ log π_T/π_Tref), data:<gap_key> (r_w − r_l "
                      "from the pair's meta) or data:<chosen_key>,<rejected_key>."},
        )
        teacher_beta: float = field(
            default=0.05,
            metadata={"help": "β_T of the teacher's implicit reward (its DPO β; 0.05 on the testbed); teacher only."},
        )
        min_gap: float = field(
            default=0.0,
            metadata={"help": "0: pairs with r_w − r_l ≤ 0 get weight 0 (dropped, counted); > 0: every gap is "
                      "floored at min_gap (log(max(r_w − r_l, min_gap)))."},
        )

        def __post_init__(self):
            if not self.beta > 0:
                raise ValueError(f"odpo: beta must be > 0, got {self.beta}")
            if not self.alpha >= 0:
                raise ValueError(f"odpo: alpha must be >= 0 (0 is DPO), got {self.alpha}")
            if not self.teacher_beta > 0:
                raise ValueError(f"odpo: teacher_beta must be > 0, got {self.teacher_beta}")
            if not self.min_gap >= 0:
                raise ValueError(f"odpo: min_gap must be >= 0 (0 drops pairs with r_w ≤ r_l), got {self.min_gap}")
            data_keys(self.offset_source, "odpo", "offset_source")

    def meta_keys(self, cfg: Config) -> tuple[str, ...]:
        return data_keys(cfg.offset_source, "odpo", "offset_source")

    def needs(self, cfg: Config) -> Needs:
        return Needs(reference=True, **source_needs(cfg.offset_source))

    def batch_columns(self, cfg: Config) -> dict[str, str]:
        return {OFFSET_COLUMN: "pair", WEIGHT_COLUMN: "pair"}

    def eval_settings(self, cfg: Config) -> EvalSettings:
        teacher = cfg.offset_source == "teacher"
        return EvalSettings(implicit_reward_beta=cfg.beta, offset_column=GAP_COLUMN if teacher else None)

    def prepare(self, dataset: Any, cfg: Config, *, seed: int) -> Any:
        """Add ``odpo_gap``, ``odpo_offset`` and ``odpo_weight`` per pair (`seed` is not used)."""
        gaps = reward_gaps(dataset, cfg.offset_source, cfg.teacher_beta, "odpo", "offset_source")
        offsets, weights = gap_offsets(gaps, cfg.min_gap)
        bad = int((gaps <= 0).sum())
        if bad:
            what = f"floored at min_gap={cfg.min_gap:g}" if cfg.min_gap > 0 else "dropped (weight 0)"
            log.warning("odpo: %d of %d pairs have r_w - r_l <= 0 (offset_source=%s); %s", bad, len(gaps),
                        cfg.offset_source, what)
        for name, values in ((GAP_COLUMN, gaps), (OFFSET_COLUMN, offsets), (WEIGHT_COLUMN, weights)):
            dataset = replace_column(dataset, name, values.tolist())
        return dataset

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        missing = [c for c in (OFFSET_COLUMN, WEIGHT_COLUMN) if c not in batch.columns]
        if missing:
            raise ValueError(f"odpo reads the per-pair columns {missing}; run ODPO.prepare on the data set")
        chosen, rejected = batch.log_ratios()
        implicit = cfg.beta * (chosen - rejected)
        offset, weight = (batch.columns[c].to(device=implicit.device, dtype=implicit.dtype)
                          for c in (OFFSET_COLUMN, WEIGHT_COLUMN))
        margin = implicit - cfg.alpha * offset
        kept = weight.sum().clamp(min=1.0)  # a batch of dropped pairs only: loss 0 (no gradient)
        losses = -F.logsigmoid(margin)
        margin_d = margin.detach()
        metrics = {
            "loss": (weight * losses.detach()).sum() / kept,
            "margin": (weight * margin_d).sum() / kept,
            "shaped_accuracy": (weight * (margin_d > 0).to(weight.dtype)).sum() / kept,
            "odpo/offset_mean": (weight * offset).sum() / kept,
            "odpo/dropped_fraction": 1.0 - weight.mean(),
        }
        metrics.update(reward_metrics(cfg.beta * chosen, cfg.beta * rejected))
        return LossOutput(loss=(weight * losses).sum() / kept, metrics=metrics, margins=implicit.detach())

