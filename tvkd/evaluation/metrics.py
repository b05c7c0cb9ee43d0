"""Analysis metrics (docs/methods.md §A.6): margin accuracy, win rate, value alignment, policy KL.

Pure functions of scores first (tested directly), then the model passes that produce them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tvkd.scoring import collate_pairs, state_logits, token_logps


def pairwise_accuracy(a: Sequence[float], b: Sequence[float], ties: str = "half") -> float:
    """Mean of [a_i > b_i], ties counted as 1/2 (`ties="half"`) or as a loss (`ties="loss"`)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"score arrays differ in shape: {a.shape} vs {b.shape}")
    if a.size == 0:
        return float("nan")
    if ties not in ("half", "loss"):
        raise ValueError(f"ties must be 'half' or 'loss', got {ties!r}")
    win = (a > b).astype(np.float64)
    if ties == "half":
        win += 0.5 * (a == b)
    return float(win.mean())


def win_rate(scores: Sequence[float], other: Sequence[float]) -> float:
    """Judge-based win rate of one system's outputs against another's on the same prompts (ties 1/2)."""
    return pairwise_accuracy(scores, other, ties="half")


def oracle_margin_accuracy(s_w: Sequence[float], s_l: Sequence[float], oracle_w: Sequence[float],
                           oracle_l: Sequence[float], ties: str = "half") -> float:
    """Agreement of a score's pair ranking with the oracle's true preference (pairs the oracle ties are left out)."""
    s_w, s_l = np.asarray(s_w, float), np.asarray(s_l, float)
    o_w, o_l = np.asarray(oracle_w, float), np.asarray(oracle_l, float)
    keep = o_w != o_l
    better = np.where(o_w > o_l, s_w, s_l)[keep]
    worse = np.where(o_w > o_l, s_l, s_w)[keep]
    return pairwise_accuracy(better, worse, ties)


@torch.no_grad()
def sequence_logps(model: Any, tokenized: Any, *, pad_id: int, batch_size: int = 64,
                   lengths_normalised: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Σ_t log π(a_t|s_t) (or the mean, when `lengths_normalised`) of chosen and rejected, per pair."""
    device = next(model.parameters()).device
    model.eval()
    n = len(tokenized)
    cw, rj = np.zeros(n), np.zeros(n)
    cols = tokenized.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    for start in range(0, n, batch_size):
        rows = cols[start: start + batch_size]
        feats = [dict(prompt_ids=p, chosen_ids=c, rejected_ids=r)
                 for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])]
        b = {k: v.to(device) for k, v in collate_pairs(feats, pad_id).items()}
        z = state_logits(model, b["input_ids"], b["attention_mask"], b["prompt_lens"], b["resp_lens"])
        lp = token_logps(z, b["response_ids"], b["response_mask"]).sum(-1)
        if lengths_normalised:
            lp = lp / b["resp_lens"]
        lp = lp.double().cpu().numpy()
        B = len(feats)
        cw[start: start + B], rj[start: start + B] = lp[:B], lp[B:]
    return cw, rj


def implicit_rewards(policy_logps: tuple[np.ndarray, np.ndarray], ref_logps: tuple[np.ndarray, np.ndarray],
                     beta: float) -> tuple[np.ndarray, np.ndarray]:
    """S = β·(log π_θ − log π_ref)(y|x) for chosen and rejected (Table 5's student score)."""
    return beta * (policy_logps[0] - ref_logps[0]), beta * (policy_logps[1] - ref_logps[1])


def soft_values(logits: torch.Tensor, beta_v: float) -> torch.Tensor:
    """V(s) = β_V · logsumexp(z/β_V) over the last axis, in fp32 (Lemma 1)."""
    return beta_v * torch.logsumexp(logits.float() / beta_v, dim=-1)


@torch.no_grad()
def value_alignment(teacher: Any, student: Any, tokenized: Any, *, beta_v: float, pad_id: int,
                    vocab_size: int | None = None, batch_size: int = 32) -> dict[str, float]:
    """Table 4: KL(teacher‖student) between position distributions of soft values, and token policy KL.

    For each chosen response, the soft values over s_0..s_T (each model from its own logits) are
    turned into a distribution over positions by a softmax; the mean KL(teacher‖student) over
    responses is `value_kl`. `policy_kl` is mean_t KL(softmax(z_T/β_V) ‖ softmax(z_θ/β_V)).
    """
    dev_t = next(teacher.parameters()).device
    dev_s = next(student.parameters()).device
    teacher.eval()
    student.eval()
    value_kls, policy_kls = [], []
    cols = tokenized.select_columns(["prompt_ids", "chosen_ids"])
    for start in range(0, len(tokenized), batch_size):
        rows = cols[start: start + batch_size]
        feats = [dict(prompt_ids=p, chosen_ids=c, rejected_ids=c) for p, c in zip(rows["prompt_ids"], rows["chosen_ids"])]
        b = collate_pairs(feats, pad_id)
        B = len(feats)
        b = {k: v[:B] for k, v in b.items()}  # chosen rows only
        zs = []
        for model, dev in ((teacher, dev_t), (student, dev_s)):
            bb = {k: v.to(dev) for k, v in b.items()}
            z = state_logits(model, bb["input_ids"], bb["attention_mask"], bb["prompt_lens"], bb["resp_lens"],
                             terminal=True).float().cpu()
            zs.append(z[..., :vocab_size] if vocab_size else z)
        zt, zs_ = zs
        smask = torch.arange(zt.shape[1])[None, :] <= b["resp_lens"][:, None]
        vt, vs = soft_values(zt, beta_v), soft_values(zs_, beta_v)
        neg = torch.finfo(torch.float32).min
        pt = torch.log_softmax(vt.masked_fill(~smask, neg), -1)
        ps = torch.log_softmax(vs.masked_fill(~smask, neg), -1)
        kl = (pt.exp() * (pt - ps)).masked_fill(~smask, 0).sum(-1)
        value_kls.extend(kl.tolist())
        amask = b["response_mask"]
        lt = torch.log_softmax(zt[:, :-1] / beta_v, -1)
        ls = torch.log_softmax(zs_[:, :-1] / beta_v, -1)
        tok_kl = (lt.exp() * (lt - ls)).sum(-1)
        policy_kls.extend(tok_kl[amask].tolist())
    return {"value_kl": float(np.mean(value_kls)), "policy_kl": float(np.mean(policy_kls))}


def teacher_scores(teacher_logps: tuple[np.ndarray, np.ndarray], lengths: tuple[np.ndarray, np.ndarray],
                   shaping: tuple[np.ndarray, np.ndarray], ties: str = "half") -> dict[str, float]:
    """Table 3: margin accuracy of the teacher's Σ log π_T, mean log π_T and shaping sum Ψ."""
    (lw, ll), (nw, nl), (pw, pl) = teacher_logps, lengths, shaping
    return {
        "sum_logprob": pairwise_accuracy(lw, ll, ties),
        "mean_logprob": pairwise_accuracy(lw / nw, ll / nl, ties),
        "shaping": pairwise_accuracy(pw, pl, ties),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson's r of average ranks (pandas' own method needs scipy)."""
    import pandas as pd

    if len(a) < 3:
        return float("nan")
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def oracle_scores(metas: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(r*(y_w), r*(y_l)) when every pair's metadata carries the oracle's scores (the testbed), else None."""
    if not metas or not all("oracle_chosen" in m and "oracle_rejected" in m for m in metas):
        return None
    return (np.array([m["oracle_chosen"] for m in metas], dtype=np.float64),
            np.array([m["oracle_rejected"] for m in metas], dtype=np.float64))


def teacher_signal(offsets: Sequence[float], metas: Sequence[dict[str, Any]] | None = None) -> dict[str, float]:
    """How a per-pair teacher offset Ψ_w − Ψ_l relates to the labels (and the oracle, where known).

    `label_agreement`: fraction of pairs with Ψ_w > Ψ_l (the teacher ranks the labelled-chosen
    response higher; ties 1/2); `oracle_agreement`: the same against the oracle's true preference
    where the data carries oracle scores (the testbed), pairs the oracle ties left out. Both depend
    only on which offsets are positive, so a permutation of the offsets (the shuffled control)
    leaves them nearly unchanged; `oracle_gap_correlation` (Spearman ρ between the offset and the
    oracle gap r*(y_w) − r*(y_l)) is pair-specific and falls to ~0 under the shuffle.
    """
    off = np.asarray(offsets, dtype=np.float64)
    out = {
        "teacher_signal/label_agreement": pairwise_accuracy(off, np.zeros_like(off)),
        "teacher_signal/abs_mean": float(np.abs(off).mean()),
    }
    oracle = oracle_scores(metas or [])
    if oracle is not None:
        ow, ol = oracle
        out["teacher_signal/oracle_agreement"] = oracle_margin_accuracy(off, np.zeros_like(off), ow, ol)
        out["teacher_signal/oracle_gap_correlation"] = spearman(off, ow - ol)
    return out
