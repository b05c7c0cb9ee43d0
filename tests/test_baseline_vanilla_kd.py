"""`vanilla_kd` against an independent float64 loop reference (docs/methods.md §A.5, §B.5.1)."""

from __future__ import annotations

import math

import pytest
import torch

from tvkd.api import LOSSES, ConfigError, ScoredBatch, build_config

B, T, V, K = 2, 4, 9, 3
LENGTHS = [4, 2, 3, 1]  # chosen rows, then rejected rows


def make_batch(seed: int = 0, student: torch.Tensor | None = None, k: int = K) -> ScoredBatch:
    """2B rows of random student/teacher logits, the teacher's top-k columns as the cache holds them."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2 * B, T, V, generator=g) * 2
    if student is None:
        student = torch.randn(2 * B, T, V, generator=g) * 2
        student[0, 1, teacher[0, 1].argmax()] = -40.0  # a student bin far below the 1e-7 floor
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    logps = torch.log_softmax(student, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    top = torch.log_softmax(teacher, -1).topk(k, -1)
    rest = torch.log_softmax(teacher, -1).scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    columns = {"topk_ids": top.indices, "topk_logprobs": top.values, "topk_rest": rest}
    return ScoredBatch(logps=logps, mask=mask, logits=student.clone().requires_grad_(), columns=columns,
                       token_ids=ids, teacher_logits=teacher)


def softmax64(z) -> list[float]:
    z = [float(x) for x in z]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def kl_token(batch: ScoredBatch, r: int, t: int, topk: bool, floor: float = 1e-7) -> float:
    """Σ_k p_k (log p_k − log max(q_k, floor)) on the hand-built bins; on the full vocabulary, the exact KL."""
    q = softmax64(batch.logits[r, t].detach())
    if topk:
        ids = [int(i) for i in batch.columns["topk_ids"][r, t]]
        q = [q[i] for i in ids] + [sum(q[v] for v in range(V) if v not in ids)]
        p = [math.exp(float(x)) for x in batch.columns["topk_logprobs"][r, t]]
        p.append(math.exp(float(batch.columns["topk_rest"][r, t])))
    else:
        p = softmax64(batch.teacher_logits[r, t])
        floor = 0.0  # the official floor belongs to the 51 bins
    return sum(pk * (math.log(pk) - math.log(max(qk, floor) if floor else qk)) for pk, qk in zip(p, q) if pk > 0)


def reference(batch: ScoredBatch, weight: float = 0.1, topk: bool = True) -> float:
    values = [kl_token(batch, r, t, topk) for r in range(B) for t in range(T) if batch.mask[r, t]]
    return weight * sum(values) / len(values)


def run(batch: ScoredBatch, **options):
    cls = LOSSES.get("vanilla_kd")
    cfg = build_config(cls, {"topk": K, **options})
    return cls()(batch, cfg)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rest_bin", ["logsumexp", "complement"])
def test_matches_the_loop_reference(seed, rest_bin):
    batch = make_batch(seed)
    out = run(batch, rest_bin=rest_bin)
    assert abs(out.loss.item() - reference(batch)) < 1e-6
    assert out.margins is None


def test_weight_and_full_vocabulary():
    batch = make_batch(3)
    assert abs(run(batch, weight=0.7).loss.item() - reference(batch, 0.7)) < 1e-6
    assert abs(run(batch, topk=None).loss.item() - reference(batch, topk=False)) < 1e-6


def test_rejected_responses_do_not_matter():
    batch = make_batch(4)
    base = run(batch).loss
    batch.logits.data[B:] = torch.randn(B, T, V) * 5
    assert torch.equal(run(batch).loss, base)


def test_zero_when_the_binned_student_equals_the_teacher():
    """Same bins, different full distribution: the non-top-k logits are permuted within each state."""
    batch = make_batch(5)
    teacher = batch.teacher_logits.clone()
    student = teacher.clone()
    for r in range(2 * B):
        for t in range(T):
            rest = [v for v in range(V) if v not in batch.columns["topk_ids"][r, t].tolist()]
            student[r, t, rest] = teacher[r, t, rest[::-1]]
    assert not torch.allclose(student, teacher)
    batch = make_batch(5, student=student)
    out = run(batch)
    assert abs(out.loss.item()) < 1e-7 and abs(reference(batch)) < 1e-7
    out.loss.backward()
    assert batch.logits.grad.abs().max() < 1e-7  # a minimum


def test_needs_and_options():
    cls = LOSSES.get("vanilla_kd")
    cfg = build_config(cls, {})
    assert (cfg.weight, cfg.topk) == (0.1, 50)
    needs = cls().needs(cfg)
    assert needs.topk == 50 and needs.student_logits and not needs.reference and not needs.teacher_logits
    online = cls().needs(build_config(cls, {"topk": None}))
    assert online.teacher_logits and not online.topk and cls().batch_columns(build_config(cls, {"topk": None})) == {}
    for bad, key in (({"weight": 0}, "weight"), ({"topk": 0}, "topk"), ({"rest_bin": "x"}, "rest_bin"),
                     ({"prob_floor": 1.5}, "prob_floor")):
        with pytest.raises(ConfigError, match=f"vanilla_kd: {key}"):
            build_config(cls, bad)
