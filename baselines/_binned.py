"""The forward KL(teacher‖student) that the KD baselines share (docs/methods.md §B.2, §B.8).

Per response token t (state s_t), on the 51-bin projection of both models at s_t (the teacher's
top-k ids, plus one bin holding the mass outside them; k = 50 in the originals):

    KL_t = Σ_{k=1}^{K+1} p_T,k · (log p_T,k − log max(q_θ,k, floor))       (0·log 0 = 0)

p_T comes from the cache (``topk_logprobs`` and ``topk_rest``, exact, fp32); q_θ from the
student's full softmax through `tvkd.losses.tvkd_released.binned_log_probs`. With ``topk=None``
the KL runs over the full vocabulary instead, against the online teacher logits (§A.5).
The floor (1e-7) is the official ``get_kl_loss``'s ``input_probs[input_probs < 1e-7] = 1e-7``:
a floored bin gets no gradient, as there. It belongs to the 51-bin form and does not apply with
``topk=None``: flooring every entry of a full vocabulary would move the KL by up to 1.6 nats on a
peaked student, so the full-vocabulary KL is the exact Σ_v p_T,v·(log p_T,v − log q_θ,v).
This module is a helper (its name starts with ``_``), imported explicitly by `baselines.vanilla_kd`
and `baselines.dckd`.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

import torch

from tvkd.api import Needs, ScoredBatch
from tvkd.losses.tvkd_released import REST_BINS, binned_log_probs

OFFICIAL_FLOOR = 1e-7


def topk_field() -> Any:
    return field(default=50, metadata={"help": "Teacher top-k ids per state that define the bins (k + 1 with the "
                                               "rest; 50 as in the originals); null: full-vocabulary KL against "
                                               "the online teacher logits."})


def rest_bin_field() -> Any:
    return field(default="logsumexp", metadata={
        "help": "The student's rest bin: logsumexp (exact, docs/methods.md §B.8) | complement (the official "
                "1 − Σ top-k of the fp32 softmax, by the official operations, floored at 1e-8)."})


def floor_field() -> Any:
    return field(default=OFFICIAL_FLOOR, metadata={
        "help": "Floor on each student bin inside the log, log max(q, floor) (official get_kl_loss: 1e-7); 0: none. "
                "Not applied with topk=null (the full-vocabulary KL is exact)."})


def check_options(name: str, topk: int | None, rest_bin: str, prob_floor: float) -> None:
    """Validate the shared KD options; the message names the loss and the option."""
    if topk is not None and not (isinstance(topk, int) and topk >= 1):
        raise ValueError(f"{name}: topk must be a positive int or null, got {topk!r}")
    if rest_bin not in REST_BINS:
        raise ValueError(f"{name}: rest_bin must be one of {', '.join(REST_BINS)}, got {rest_bin!r}")
    if not 0.0 <= prob_floor < 1.0:
        raise ValueError(f"{name}: prob_floor must lie in [0, 1), got {prob_floor!r}")


def needs(topk: int | None) -> Needs:
    return Needs(topk=topk, student_logits=True) if topk else Needs(student_logits=True, teacher_logits=True)


def batch_columns(topk: int | None) -> dict[str, str]:
    return {"topk_ids": "topk", "topk_logprobs": "topk", "topk_rest": "token"} if topk else {}


def log_bins(batch: ScoredBatch, rows: slice, topk: int | None, rest_bin: str, name: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_T, log q_θ), each [n, T, K+1] (or [n, T, V_T] with ``topk=None``), for batch rows `rows`."""
    if batch.logits is None:
        raise ValueError(f"{name} needs the student logits (Needs.student_logits)")
    logits = batch.logits[rows]
    if not topk:
        if batch.teacher_logits is None:
            raise ValueError(f"{name} with topk=null needs the online teacher logits (Needs.teacher_logits)")
        teacher = batch.teacher_logits[rows].float()
        v = teacher.shape[-1]
        if v > logits.shape[-1]:
            raise ValueError(f"{name}: the teacher logits have {v} rows, more than the student's {logits.shape[-1]}")
        # the teacher has no mass on the student's padded rows (ids ≥ v), so they drop out of the KL
        return torch.log_softmax(teacher, -1), torch.log_softmax(logits.float(), -1)[..., :v]
    missing = [c for c in batch_columns(topk) if c not in batch.columns]
    if missing:
        raise ValueError(f"{name} needs the teacher's cached top-k (batch columns {missing})")
    ids = batch.columns["topk_ids"][rows]
    if ids.shape[-1] >= logits.shape[-1]:
        raise ValueError(f"{name}: top-k ({ids.shape[-1]}) must be smaller than the vocabulary ({logits.shape[-1]})")
    log_p = torch.cat([batch.columns["topk_logprobs"][rows].float(),
                       batch.columns["topk_rest"][rows].float().unsqueeze(-1)], dim=-1)
    return log_p, binned_log_probs(logits, ids, rest_bin)


def forward_kl(batch: ScoredBatch, rows: slice, topk: int | None, rest_bin: str, prob_floor: float,
               name: str) -> torch.Tensor:
    """[n, T] per-token KL(p_T ‖ max(q_θ, floor)) for batch rows `rows`; exactly 0 (and no gradient) at padding.

    The floor applies to the k+1 bins only; with ``topk=None`` the KL is the exact full-vocabulary one.
    """
    log_p, log_q = log_bins(batch, rows, topk, rest_bin, name)
    if prob_floor > 0 and topk:
        log_q = log_q.clamp(min=math.log(prob_floor))
    p = log_p.exp()
    kl = (p * (log_p.masked_fill(p == 0, 0.0) - log_q)).sum(-1)
    mask = batch.mask[rows]
    return torch.where(mask, kl, torch.zeros_like(kl))


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values / number of valid tokens, pooled over the rows (the official ``[mask].mean()``)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)
