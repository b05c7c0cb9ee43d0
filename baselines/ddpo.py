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
The helpers `teacher_rewards` and `reward_gaps` are shared with `odpo`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tvkd.api import (
    LOSSES,
    TEACHER_REFERENCE_PREFIX,
    AuxSpec,
    EvalSettings,
    LossOutput,
    Needs,
    PreferenceLoss,
    ScoredBatch,
    reward_metrics,
)

TARGET_COLUMN = "ddpo_target"
SIDES = ("chosen", "rejected")


def data_keys(source: str, loss: str, option: str) -> tuple[str, ...]:
    """() for ``teacher``; the meta key(s) of ``data:<gap_key>`` or ``data:<chosen_key>,<rejected_key>``."""
    if source == "teacher":
        return ()
    keys = tuple(k.strip() for k in source[len("data:"):].split(",")) if source.startswith("data:") else ()
    if not keys or len(keys) > 2 or not all(keys):
        raise ValueError(f"{loss}: {option} must be 'teacher', 'data:<gap_key>' or 'data:<chosen_key>,<rejected_key>'"
                         f" (keys of the pairs' meta), got {source!r}")
    return keys


def source_needs(source: str) -> dict[str, Any]:
    """The `Needs` fields a reward source adds: the teacher's and π_Tref's `log_prob` columns, or nothing."""
    if source != "teacher":
        return {}
    return {"aux": (AuxSpec("log_prob"),), "teacher_reference_aux": (AuxSpec("log_prob"),)}


def teacher_rewards(dataset: Any, teacher_beta: float, loss: str) -> tuple[np.ndarray, np.ndarray]:
    """(r_T(y_w), r_T(y_l)) per pair in float64: r_T(y) = β_T·Σ_t (log π_T − log π_Tref)(a_t|s_t)."""
    cols = [f"{side}/{prefix}log_prob" for side in SIDES for prefix in ("", TEACHER_REFERENCE_PREFIX)]
    missing = [c for c in cols if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{loss} needs the teacher and teacher-reference cache columns {missing}; "
                         f"the data set has {sorted(dataset.column_names)}")
    rewards: dict[str, list[float]] = {side: [] for side in SIDES}
    for batch in dataset.select_columns(cols).iter(batch_size=1024):
        for side in SIDES:
            for lp_t, lp_ref in zip(batch[f"{side}/log_prob"], batch[f"{side}/{TEACHER_REFERENCE_PREFIX}log_prob"]):
                if len(lp_t) != len(lp_ref):
                    raise ValueError(f"{loss}: the teacher and teacher-reference log_prob rows differ in length "
                                     f"({len(lp_t)} vs {len(lp_ref)}) on the {side} side")
                diff = np.asarray(lp_t, dtype=np.float64) - np.asarray(lp_ref, dtype=np.float64)
                rewards[side].append(teacher_beta * float(diff.sum()))
    return np.asarray(rewards["chosen"]), np.asarray(rewards["rejected"])


def _meta_number(meta: dict, key: str, row: int, row_id: Any, loss: str, option: str) -> float:
    where = f"row {row}" + (f" (id {row_id!r})" if row_id is not None else "")
    if key not in meta:
        raise ValueError(f"{loss}: {option} reads the meta key {key!r}, but {where} has no such key; "
                       f"its meta keys are {sorted(meta)}")
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{loss}: meta key {key!r} of {where} must be a number, got {value!r}")
    return float(value)


def reward_gaps(dataset: Any, source: str, teacher_beta: float, loss: str, option: str) -> np.ndarray:
    """r_w − r_l per pair (float64), from the teacher's implicit reward or from the pairs' ``meta`` JSON."""
    keys = data_keys(source, loss, option)
    if not keys:
        chosen, rejected = teacher_rewards(dataset, teacher_beta, loss)
        return chosen - rejected
    if "meta" not in dataset.column_names:
        raise ValueError(f"{loss}: {option}={source!r} reads the pairs' 'meta' column, which the data set lacks; "
                         f"it has {sorted(dataset.column_names)}")
    ids = dataset["id"] if "id" in dataset.column_names else [None] * len(dataset)
    gaps = []
    for row, (meta, row_id) in enumerate(zip(dataset["meta"], ids)):
        meta = json.loads(meta) if isinstance(meta, str) else dict(meta or {})
        values = [_meta_number(meta, k, row, row_id, loss, option) for k in keys]
        gaps.append(values[0] if len(values) == 1 else values[0] - values[1])
    return np.asarray(gaps, dtype=np.float64)


def replace_column(dataset: Any, name: str, values: list[float]) -> Any:
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    return dataset.add_column(name, values)


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

    @dataclass
    class Config:
        beta: float = field(default=0.1, metadata={"help": "β, the scale of the student's implicit reward."})
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
