"""Per-pair reward gaps r(y_w) − r(y_l) from the teacher or from the data: TVKD's, ODPO's and DDPO's offsets.

Sources (a loss option such as `offset_source` or `target_source`):
- ``teacher``: the teacher's DPO implicit reward r_T(y) = β_T·Σ_t (log π_T − log π_Tref)(a_t|s_t), from the cached
  per-token `log_prob` columns of the teacher (``{side}/log_prob``) and of its SFT model (``{side}/tref:log_prob``);
- ``data:<gap_key>``: a gap stored in each pair's ``meta`` (e.g. HelpSteer2's ``helpfulness_gap``);
- ``data:<chosen_key>,<rejected_key>``: two scores in ``meta`` (e.g. the testbed's ``oracle_chosen,oracle_rejected``:
  the oracle's gap, a perfect teacher).
`PreferenceLoss.meta_keys` declares the keys a configuration reads, so the pipeline checks them in the loaded data,
naming the file, before any work.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tvkd.api import TEACHER_REFERENCE_PREFIX, AuxSpec

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
