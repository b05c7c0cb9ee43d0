"""`dckd` against an independent float64 loop reference (docs/methods.md §A.5, §B.2)."""

from __future__ import annotations

import math

import pytest
import torch

from tvkd.api import LOSSES, ConfigError, ScoredBatch, build_config

B, T, V, K = 2, 4, 9, 3
LENGTHS = [4, 2, 3, 1]  # chosen rows, then rejected rows


def make_batch(seed: int = 0) -> ScoredBatch:
    """2B rows of random student/teacher logits, the teacher's top-k columns as the cache holds them."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2 * B, T, V, generator=g) * 2
    student = torch.randn(2 * B, T, V, generator=g) * 2
    student[B, 0, teacher[B, 0].argmax()] = -40.0  # a student bin far below the 1e-7 floor
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    logps = torch.log_softmax(student, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    top = torch.log_softmax(teacher, -1).topk(K, -1)
    rest = torch.log_softmax(teacher, -1).scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    columns = {"topk_ids": top.indices, "topk_logprobs": top.values, "topk_rest": rest}
    ref_logps = (torch.randn(2 * B, T, generator=g) - 2) * mask
    return ScoredBatch(logps=logps.requires_grad_(), mask=mask, logits=student.requires_grad_(), columns=columns,
                       token_ids=ids, ref_logps=ref_logps)


def log_softmax64(z) -> list[float]:
    z = [float(x) for x in z]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def kl_token(batch: ScoredBatch, r: int, t: int, floor: float = 1e-7) -> float:
    """Σ_k p_k (log p_k − log max(q_k, floor)) on bins built by hand from the student's full softmax."""
    q = [math.exp(x) for x in log_softmax64(batch.logits[r, t].detach())]
    ids = [int(i) for i in batch.columns["topk_ids"][r, t]]
    q = [q[i] for i in ids] + [sum(q[v] for v in range(V) if v not in ids)]
    p = [math.exp(float(x)) for x in batch.columns["topk_logprobs"][r, t]]
    p.append(math.exp(float(batch.columns["topk_rest"][r, t])))
    return sum(pk * (math.log(pk) - math.log(max(qk, floor))) for pk, qk in zip(p, q) if pk > 0)


def reference(batch: ScoredBatch, sft=1.0, kl_w=0.1, kl_l=0.1, dpo=0.0, beta=0.01) -> float:
    def mean(rows, f):
        values = [f(r, t) for r in rows for t in range(T) if batch.mask[r, t]]
        return sum(values) / len(values)

    nll = mean(range(B), lambda r, t: -log_softmax64(batch.logits[r, t].detach())[int(batch.token_ids[r, t])])
    def kl(r, t):
        return kl_token(batch, r, t)

    loss = sft * nll + kl_w * mean(range(B), kl) + kl_l * mean(range(B, 2 * B), kl)
    if dpo:
        def delta(r):
            logps = batch.logps.detach()
            return sum(float(logps[r, t]) - float(batch.ref_logps[r, t]) for t in range(LENGTHS[r]))
        margins = [beta * (delta(i) - delta(B + i)) for i in range(B)]
        loss += dpo * sum(math.log1p(math.exp(-m)) for m in margins) / B
    return loss


def run(batch: ScoredBatch, **options):
    cls = LOSSES.get("dckd")
    cfg = build_config(cls, {"topk": K, **options})
    return cls()(batch, cfg)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rest_bin", ["logsumexp", "complement"])
def test_matches_the_loop_reference(seed, rest_bin):
    batch = make_batch(seed)
    out = run(batch, rest_bin=rest_bin)
    assert abs(out.loss.item() - reference(batch)) < 1e-6
    assert out.margins is None


def test_weights_and_the_dpo_term():
    batch = make_batch(3)
    options = {"sft_weight": 0.5, "chosen_kl_weight": 0.3, "rejected_kl_weight": 0.2, "dpo_weight": 0.7, "beta": 0.1}
    out = run(batch, **options)
    expected = reference(batch, sft=0.5, kl_w=0.3, kl_l=0.2, dpo=0.7, beta=0.1)
    assert abs(out.loss.item() - expected) < 1e-6
    assert out.margins.shape == (B,)


def test_without_kl_it_is_sft():
    batch = make_batch(4)
    sft = LOSSES.get("sft")
    expected = sft()(batch, build_config(sft, {})).loss
    assert torch.equal(run(batch, chosen_kl_weight=0, rejected_kl_weight=0).loss, expected)


def test_zero_kl_when_the_student_equals_the_teacher():
    batch = make_batch(5)
    teacher = batch.logits.detach().clone()
    top = torch.log_softmax(teacher, -1).topk(K, -1)
    batch.columns = {"topk_ids": top.indices, "topk_logprobs": top.values,
                     "topk_rest": torch.log_softmax(teacher, -1).scatter(-1, top.indices, float("-inf")).logsumexp(-1)}
    out = run(batch)
    assert abs(out.metrics["kl/chosen"].item()) < 1e-7 and abs(out.metrics["kl/rejected"].item()) < 1e-7


def test_needs_the_reference_only_with_dpo():
    cls = LOSSES.get("dckd")
    cfg = build_config(cls, {})
    assert (cfg.sft_weight, cfg.chosen_kl_weight, cfg.rejected_kl_weight, cfg.topk, cfg.dpo_weight) == (1, .1, .1, 50, 0)
    needs = cls().needs(cfg)
    assert needs.topk == 50 and needs.student_logits and not needs.reference
    assert cls().eval_settings(cfg).implicit_reward_beta == 1.0
    with_dpo = build_config(cls, {"dpo_weight": 1.0, "beta": 0.05})
    assert cls().needs(with_dpo).reference and cls().eval_settings(with_dpo).implicit_reward_beta == 0.05
    batch = make_batch(6)
    batch.ref_logps = None
    with pytest.raises(ValueError, match="reference"):
        run(batch, dpo_weight=1.0)
    for bad, key in (({"sft_weight": -1}, "sft_weight"), ({"rejected_kl_weight": -0.1}, "rejected_kl_weight"),
                     ({"beta": 0}, "beta"), ({"topk": 0}, "topk"), ({"rest_bin": "x"}, "rest_bin")):
        with pytest.raises(ConfigError, match=f"dckd: {key}"):
            build_config(cls, bad)
