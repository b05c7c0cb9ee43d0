"""The official code's numerics on a peaked student (issue: the rest bin, the full-vocabulary KL).

The released TVKD, DCKD and VanillaKD code builds the student's 51 bins from the fp32 softmax and
takes the rest bin as 1 − Σ top-k. On a peaked student (logit scale ≥ 12) the mass outside the
top-k is near fp32 resolution, so that bin is mostly rounding and only the same operations give the
released numbers. The references below build the bins position by position, as the official
``load_input_and_target_probs_fast`` does (fp32 softmax of the position's logits, gathered into a
k+1 buffer, last bin 1 − buffer[:k].sum()), and compute everything after the bins in float64 loops.
"""

from __future__ import annotations

import math

import pytest
import torch

from tvkd.api import LOSSES, ScoredBatch, build_config

B, T, V, K = 2, 10, 64, 8
LENGTHS = [10, 6, 8, 4]


def peaked_batch(seed: int, scale: float) -> ScoredBatch:
    """Student logits randn·scale, the teacher's top-k ids near the student's, the taken token mostly its argmax."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * B, T, V, generator=g) * scale
    teacher = z + torch.randn(2 * B, T, V, generator=g)
    top = torch.log_softmax(teacher, -1).topk(K, -1)
    rest = torch.log_softmax(teacher, -1).scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    other = torch.randint(0, V, (2 * B, T), generator=g)
    tok = torch.where(torch.rand(2 * B, T, generator=g) < 0.8, z.argmax(-1), other)
    mask = torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]
    logps = torch.log_softmax(z, -1).gather(-1, tok[..., None])[..., 0] * mask
    cols = {"topk_ids": top.indices, "topk_logprobs": top.values, "topk_rest": rest}
    return ScoredBatch(logps=logps, mask=mask, logits=z, token_ids=tok, columns=cols, teacher_logits=teacher)


def official_bins(z_row: torch.Tensor, ids_row: torch.Tensor) -> list[float]:
    """One position's q_θ as the released code builds it, fp32, unclamped (returned as Python floats)."""
    probs = torch.softmax(z_row.float(), dim=-1)
    buf = torch.zeros(len(ids_row) + 1)
    for j, i in enumerate(ids_row.tolist()):
        buf[j] = probs[i]
    buf[-1] = 1 - buf[:-1].sum()
    return [float(x) for x in buf]


def exact_bins(z_row: torch.Tensor, ids_row: torch.Tensor) -> list[float]:
    """The same bins in float64 from the logits (the rest bin as the sum of the non-top-k probabilities)."""
    z = [float(x) for x in z_row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    ids = [int(i) for i in ids_row]
    return [e[i] / s for i in ids] + [sum(e[v] for v in range(len(z)) if v not in ids) / s]


def released_reference(batch: ScoredBatch, bins=official_bins, gamma: float = 1.0) -> float:
    """−log σ(R_w − R_l), R = Σ_{content t} [log q(bin(a_t)) − γ·H(q(s_{t+1}))], q clamped to [1e-8, 1 − 1e-8]."""
    def q_at(r, t):
        return [min(max(x, 1e-8), 1 - 1e-8) for x in bins(batch.logits[r, t], batch.columns["topk_ids"][r, t])]

    rewards = []
    for r in range(2 * B):
        n, total = LENGTHS[r], 0.0
        for t in range(n - 1):  # EOS (the last token) excluded
            ids = batch.columns["topk_ids"][r, t].tolist()
            a = int(batch.token_ids[r, t])
            total += math.log(q_at(r, t)[ids.index(a) if a in ids else K])
            if t + 1 < n - 1:  # the entropy at the EOS position is 0
                q = q_at(r, t + 1)
                total -= gamma * -sum(x * math.log(x) for x in q)
        rewards.append(total)
    return sum(math.log1p(math.exp(-(rewards[i] - rewards[B + i]))) for i in range(B)) / B


def kl_reference(batch: ScoredBatch, rows, bins=official_bins, floor: float = 1e-7) -> float:
    """Token mean of Σ_k p_k (log p_k − log max(clamp(q_k), floor)) over `rows`."""
    values = []
    for r in rows:
        for t in range(LENGTHS[r]):
            q = bins(batch.logits[r, t], batch.columns["topk_ids"][r, t])
            q = [min(max(x, 1e-8), 1 - 1e-8) for x in q]
            p = [math.exp(float(x)) for x in batch.columns["topk_logprobs"][r, t]]
            p.append(math.exp(float(batch.columns["topk_rest"][r, t])))
            values.append(sum(pk * (math.log(pk) - math.log(max(qk, floor))) for pk, qk in zip(p, q) if pk > 0))
    return sum(values) / len(values)


@pytest.mark.parametrize("scale", [4.0, 12.0, 16.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tvkd_released_reproduces_the_released_rest_bin(seed, scale):
    batch = peaked_batch(seed, scale)
    cls = LOSSES.get("tvkd_released")
    got = cls()(batch, build_config(cls, {"topk": K})).loss.item()
    want = released_reference(batch)
    assert abs(got - want) < 1e-5 * max(1.0, abs(want))
    # the exact (logsumexp) flag against the exact float64 bins
    exact = cls()(batch, build_config(cls, {"topk": K, "rest_bin": "logsumexp"})).loss.item()
    assert abs(exact - released_reference(batch, exact_bins)) < 1e-5 * max(1.0, abs(exact))


def test_the_check_is_sensitive_on_a_peaked_student():
    """At logit scale 12 the released rest bin is far from the exact one: the form is what is being tested."""
    gaps = [abs(released_reference(peaked_batch(s, 12.0)) - released_reference(peaked_batch(s, 12.0), exact_bins))
            for s in range(3)]
    assert max(gaps) > 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vanilla_kd_and_dckd_complement_is_the_official_bin(seed):
    batch = peaked_batch(seed, 12.0)
    vkd = LOSSES.get("vanilla_kd")
    got = vkd()(batch, build_config(vkd, {"topk": K, "rest_bin": "complement"})).loss.item()
    assert abs(got - 0.1 * kl_reference(batch, range(B))) < 1e-6
    dckd = LOSSES.get("dckd")
    out = dckd()(batch, build_config(dckd, {"topk": K, "rest_bin": "complement", "sft_weight": 0.0}))
    assert abs(out.metrics["kl/chosen"].item() - kl_reference(batch, range(B))) < 1e-5
    assert abs(out.metrics["kl/rejected"].item() - kl_reference(batch, range(B, 2 * B))) < 1e-5


def full_kl_reference(batch: ScoredBatch, rows) -> float:
    """Token mean of the exact full-vocabulary KL(softmax(z_T) ‖ softmax(z_θ)) in float64, no floor."""
    def log_softmax(z):
        z = [float(x) for x in z]
        m = max(z)
        lse = m + math.log(sum(math.exp(x - m) for x in z))
        return [x - lse for x in z]

    values = []
    for r in rows:
        for t in range(LENGTHS[r]):
            lp, lq = log_softmax(batch.teacher_logits[r, t]), log_softmax(batch.logits[r, t])
            values.append(sum(math.exp(a) * (a - b) for a, b in zip(lp, lq)))
    return sum(values) / len(values)


@pytest.mark.parametrize("scale", [2.0, 12.0])
def test_topk_null_is_the_exact_full_vocabulary_kl(scale):
    batch = peaked_batch(3, scale)
    # a teacher that disagrees with the peaked student, so some of its mass sits where q_θ < 1e-7
    batch.teacher_logits = torch.randn(2 * B, T, V, generator=torch.Generator().manual_seed(9)) * 2
    want_w, want_l = full_kl_reference(batch, range(B)), full_kl_reference(batch, range(B, 2 * B))
    vkd = LOSSES.get("vanilla_kd")
    got = vkd()(batch, build_config(vkd, {"topk": None, "weight": 1.0})).loss.item()
    assert abs(got - want_w) < 1e-5 * max(1.0, want_w)
    dckd = LOSSES.get("dckd")
    out = dckd()(batch, build_config(dckd, {"topk": None}))
    assert abs(out.metrics["kl/chosen"].item() - want_w) < 1e-5 * max(1.0, want_w)
    assert abs(out.metrics["kl/rejected"].item() - want_l) < 1e-5 * max(1.0, want_l)
    if scale >= 12:  # the 1e-7 floor would have mattered here
        floored = torch.log_softmax(batch.logits.float(), -1).clamp(min=math.log(1e-7))
        p = torch.softmax(batch.teacher_logits, -1)
        kl = (p * (p.log() - floored)).sum(-1)[:B][batch.mask[:B]].mean().item()
        assert abs(kl - want_w) > 0.1
