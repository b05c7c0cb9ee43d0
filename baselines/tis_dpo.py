"""TIS-DPO (Liu et al., 2025, "TIS-DPO: Token-level Importance Sampling for Direct Preference
Optimization with Estimated Weights", ICLR; official code exlaw/TIS-DPO): DPO with per-token weights.

    raw_t   = log π_rev(y_t|s_t) − log π_dpo(y_t|s_t), negated on the chosen response
    w_t     = transform(raw) within each response:  rank: linear in rank over [0.7, 1.3] (README)
                                                     binary: 1 for the top `top_percent` % of tokens, else 0
    u       = Σ_t w^w_t·(log π_θ − log π_ref)(y^w_t) − Σ_t w^l_t·(log π_θ − log π_ref)(y^l_t)
    L       = −log σ(β·u),  β = 0.1

docs/methods.md §B.4.5 and §A.5. π_dpo and π_rev are DPO models trained from the student's
initialisation on the pairs and on the swapped pairs (`Needs.contrast`, cached; `tvkd.contrast`).
The paper's weight k·exp(μ·clamp(r, L, U)) is not what the official code does; this follows the
code. Its default config is `binary` with top_percent 100 (all weights 1, plain DPO); the README's
recipe, and this default, is `rank`. The paper's Table 1 row "TDPO [17]" is this method.

Ties are broken by position, the earlier token first, in both transforms. `rank` sorts the raw
values ascending with a stable sort, so of two equal values the earlier token gets the lower rank
(the official ``sorted(range(n), key=nums.__getitem__)`` does the same). `binary` keeps the
int(n·top_percent/100) largest values (the official count, rounded down), sorting descending with
a stable sort, so of tied values the earlier tokens are kept. The official ``binary_weight_transform``
maps each distinct value to one weight through a dict, so a group of tied values that straddles the
cut gets the weight of its last member, 0, and fewer than int(n·top_percent/100) tokens are kept;
that is not reproduced (it makes the kept count depend on ties). With untrained contrast models every
raw value is tied at 0, so these rules would decide every weight: `tvkd.contrast` makes sure the
models train (no warm-up step at a learning rate of 0) and reports their mean |log-ratio|.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn.functional as F

from tvkd.api import (
    CONTRAST_PREFIX,
    LOSSES,
    ContrastModels,
    EvalSettings,
    LossOutput,
    Needs,
    PreferenceLoss,
    ScoredBatch,
    reward_metrics,
)

TRANSFORMS = ("rank", "binary")
WEIGHT = "tis_weight"


def token_weights(raw: np.ndarray, transform: str, low: float = 0.7, high: float = 1.3,
                  top_percent: float = 100.0) -> np.ndarray:
    """Per-token weights of one response from its raw importance values (official transforms)."""
    n = len(raw)
    if n == 0:
        return np.zeros(0)
    if transform == "rank":
        if n == 1:
            return np.full(n, (low + high) / 2)
        ranks = np.empty(n)
        ranks[np.argsort(raw, kind="stable")] = np.arange(n)  # ties: the earlier token ranks lower
        return low + (high - low) * ranks / (n - 1)
    keep = int(n * top_percent / 100.0)  # the official count (rounded down)
    order = np.argsort(-np.asarray(raw, dtype=np.float64), kind="stable")  # descending; ties: earlier first
    weights = np.zeros(n)
    weights[order[:keep]] = 1.0
    return weights


@LOSSES.register(
    "tis_dpo",
    needs="reference log-probs + per-token log-probs of a DPO and a reverse-DPO model (trained and cached)",
    citation="Liu et al., 2025, TIS-DPO: Token-level Importance Sampling for Direct Preference Optimization with "
             "Estimated Weights, ICLR (official code exlaw/TIS-DPO)",
    reference_free=False,
)
class TISDPO(PreferenceLoss):
    """L = −log σ(β(Σ w^w (log π_θ − log π_ref)(y^w) − Σ w^l (log π_θ − log π_ref)(y^l)))."""

    name = "tis_dpo"

    @dataclass
    class Config:
        beta: float = field(default=0.1, metadata={"help": "β of the weighted DPO margin."})
        transform: str = field(default="rank", metadata={
            "help": "Token weights from the raw importance: rank (README: linear in rank over [low, high]) | "
                    "binary (1 for the top top_percent %, official default config with 100: plain DPO)."})
        low: float = field(default=0.7, metadata={"help": "Weight of the lowest-ranked token (rank transform)."})
        high: float = field(default=1.3, metadata={"help": "Weight of the highest-ranked token (rank transform)."})
        top_percent: float = field(default=100.0, metadata={"help": "Tokens kept by the binary transform (%)."})
        contrast_beta: float = field(default=0.1, metadata={"help": "β of the DPO and reverse-DPO models."})
        contrast_learning_rate: float = field(default=3e-5, metadata={
            "help": "Learning rate of the DPO and reverse-DPO models (from the student's initialisation)."})
        contrast_epochs: float = field(default=1.0, metadata={"help": "Epochs of the DPO and reverse-DPO models."})

        def __post_init__(self):
            if self.transform not in TRANSFORMS:
                raise ValueError(f"tis_dpo: transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}")
            if not self.beta > 0:
                raise ValueError(f"tis_dpo: beta must be > 0, got {self.beta}")
            if not 0 <= self.low <= self.high:
                raise ValueError(f"tis_dpo: need 0 <= low <= high, got {self.low}, {self.high}")
            if not 0 < self.top_percent <= 100:
                raise ValueError(f"tis_dpo: top_percent must lie in (0, 100], got {self.top_percent}")
            ContrastModels(self.contrast_beta, self.contrast_learning_rate, self.contrast_epochs)

    def needs(self, cfg: Config) -> Needs:
        return Needs(reference=True, contrast=ContrastModels(cfg.contrast_beta, cfg.contrast_learning_rate,
                                                             cfg.contrast_epochs))

    def batch_columns(self, cfg: Config) -> dict[str, str]:
        return {WEIGHT: "token"}

    def eval_settings(self, cfg: Config) -> EvalSettings:
        return EvalSettings(implicit_reward_beta=cfg.beta)

    def prepare(self, dataset: Any, cfg: Config, *, seed: int) -> Any:
        """Add ``{side}/tis_weight``: per-token weights from the contrast models' log-probs."""
        cols = {s: (f"{s}/{CONTRAST_PREFIX}dpo_logps", f"{s}/{CONTRAST_PREFIX}rev_logps") for s in ("chosen", "rejected")}
        missing = [c for pair in cols.values() for c in pair if c not in dataset.column_names]
        if missing:
            raise ValueError(f"tis_dpo needs the contrast models' columns {missing} (Needs.contrast)")

        def weights(batch: dict[str, list]) -> dict[str, list]:
            out = {}
            for side, (dpo, rev) in cols.items():
                sign = -1.0 if side == "chosen" else 1.0
                out[f"{side}/{WEIGHT}"] = [
                    token_weights(sign * (np.asarray(r, float) - np.asarray(d, float)), cfg.transform, cfg.low,
                                  cfg.high, cfg.top_percent).tolist()
                    for d, r in zip(batch[dpo], batch[rev])]
            return out

        return dataset.map(weights, batched=True, desc="tis_dpo token weights")

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        if WEIGHT not in batch.columns:
            raise ValueError("tis_dpo reads the token column 'tis_weight'; run TISDPO.prepare on the data set")
        if batch.ref_logps is None:
            raise ValueError("tis_dpo needs reference log-probs (Needs.reference)")
        w = batch.columns[WEIGHT].to(batch.logps.dtype)
        ratio = ((batch.logps - batch.ref_logps) * w * batch.mask).sum(-1)
        chosen, rejected = batch.split(ratio)
        margin = cfg.beta * (chosen - rejected)
        losses = -F.logsigmoid(margin)
        metrics = {"loss": losses.detach().mean(), "margin": margin.detach().mean(),
                   "weight_mean": (w * batch.mask).sum().detach() / batch.mask.sum().clamp(min=1)}
        metrics.update(reward_metrics(cfg.beta * chosen, cfg.beta * rejected))
        return LossOutput(loss=losses.mean(), metrics=metrics, margins=margin.detach())
