"""`dpkd` (official token-level form) against an independent float64 loop reference (docs/methods.md §B.5.4)."""

from __future__ import annotations

import math

import pytest
import torch

from tvkd.api import LOSSES, ConfigError, ScoredBatch, build_config

B, T, V = 2, 4, 9
LENGTHS = [4, 2, 3, 1]  # chosen rows, then rejected rows


def make_batch(seed: int = 0, teacher_rows: int = V, student: torch.Tensor | None = None) -> ScoredBatch:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2 * B, T, teacher_rows, generator=g) * 2
    if student is None:
        student = torch.randn(2 * B, T, V, generator=g) * 2
        student[0, 0, teacher[0, 0].argmax()] = 9.0  # one token where the argmaxes agree
        student[1, 1, V - 1] = 12.0  # the student's argmax on a row the teacher may lack
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    logps = torch.log_softmax(student, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    return ScoredBatch(logps=logps.requires_grad_(), mask=mask, logits=student.clone().requires_grad_(),
                       token_ids=ids, teacher_logits=teacher)


def log_softmax64(z) -> list[float]:
    z = [float(x) for x in z]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference(batch: ScoredBatch, beta=0.1, kd_ratio=0.5, loss_type="sigmoid", eps=0.0, lam=50.0) -> float:
    nll, distil, n = 0.0, 0.0, 0
    for r in range(B):
        for t in range(LENGTHS[r]):
            s = log_softmax64(batch.logits[r, t].detach())
            te = log_softmax64(batch.teacher_logits[r, t])
            shared = min(len(s), len(te))
            y_t = max(range(shared), key=lambda v: te[v])
            y_s = max(range(shared), key=lambda v: s[v])
            h = (s[y_t] - s[y_s]) - (te[y_t] - te[y_s])
            if loss_type == "ipo":
                distil += (h - 1 / (2 * beta)) ** 2
            elif loss_type == "dpop":
                distil += -log_sigmoid(beta * h) + lam * max(0.0, te[y_t] - s[y_t])
            else:
                distil += -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
            nll -= s[int(batch.token_ids[r, t])]
            n += 1
    return (1 - kd_ratio) * nll / n + kd_ratio * distil / n


def run(batch: ScoredBatch, **options):
    cls = LOSSES.get("dpkd")
    return cls()(batch, build_config(cls, options))


@pytest.mark.parametrize("teacher_rows", [V, V - 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_loop_reference(seed, teacher_rows):
    batch = make_batch(seed, teacher_rows)
    out = run(batch)
    assert abs(out.loss.item() - reference(batch)) < 1e-6
    assert out.margins is None


@pytest.mark.parametrize("options,kwargs", [
    ({"loss_type": "ipo"}, {"loss_type": "ipo"}),
    ({"loss_type": "dpop", "dpop_lambda": 2.0}, {"loss_type": "dpop", "lam": 2.0}),
    ({"label_smoothing": 0.2, "beta": 0.5, "kd_ratio": 0.8}, {"eps": 0.2, "beta": 0.5, "kd_ratio": 0.8}),
])
def test_official_variants(options, kwargs):
    batch = make_batch(3, V - 1)
    expected = reference(batch, **kwargs)  # IPO's loss is ~40: fp32 holds it to ~1e-7 relative
    assert abs(run(batch, **options).loss.item() - expected) < 1e-6 * max(1.0, abs(expected))


def test_rejected_responses_do_not_matter():
    batch = make_batch(4)
    base = run(batch).loss
    batch.logits.data[B:] = torch.randn(B, T, V) * 5
    batch.teacher_logits[B:] = torch.randn(B, T, V)
    assert torch.equal(run(batch).loss, base)


def test_log_2_per_token_and_no_gradient_when_the_student_is_the_teacher():
    teacher = make_batch(5).teacher_logits
    batch = make_batch(5, student=teacher.clone())
    out = run(batch, kd_ratio=1.0)
    assert abs(out.metrics["distil"].item() - math.log(2)) < 1e-6 and out.metrics["argmax_agreement"] == 1
    out.loss.backward()
    assert torch.count_nonzero(batch.logits.grad) == 0
    losses, _ = LOSSES.get("dpkd")().token_losses(batch, build_config(LOSSES.get("dpkd"), {}))
    assert torch.allclose(losses[batch.mask[:B]], torch.tensor(math.log(2)))


def test_needs_and_options():
    cls = LOSSES.get("dpkd")
    cfg = build_config(cls, {})
    assert (cfg.beta, cfg.kd_ratio, cfg.loss_type) == (0.1, 0.5, "sigmoid")
    needs = cls().needs(cfg)
    assert needs.student_logits and needs.teacher_logits and not needs.reference and not needs.topk
    batch = make_batch(6)
    batch.teacher_logits = None
    with pytest.raises(ValueError, match="teacher logits"):
        cls()(batch, cfg)
    for bad, key in (({"beta": 0}, "beta"), ({"kd_ratio": 1.5}, "kd_ratio"), ({"loss_type": "x"}, "loss_type"),
                     ({"label_smoothing": 0.5}, "label_smoothing"),
                     ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
                     ({"dpop_lambda": -1}, "dpop_lambda")):
        with pytest.raises(ConfigError, match=f"dpkd: {key}"):
            build_config(cls, bad)


def sequence_reference(batch: ScoredBatch, beta=0.1, kd_ratio=0.5, loss_type="sigmoid", eps=0.0, lam=50.0) -> float:
    """form=sequence in float64: h = Σ(log π_θ − log π_T)(y_w) − Σ(log π_θ − log π_T)(y_l), per pair."""
    def ratio(r):
        total = 0.0
        for t in range(LENGTHS[r]):
            a = int(batch.token_ids[r, t])
            total += log_softmax64(batch.logits[r, t].detach())[a] - log_softmax64(batch.teacher_logits[r, t])[a]
        return total

    nll = sum(-log_softmax64(batch.logits[r, t].detach())[int(batch.token_ids[r, t])]
              for r in range(B) for t in range(LENGTHS[r]))
    nll /= sum(LENGTHS[:B])
    distil = 0.0
    for i in range(B):
        h = ratio(i) - ratio(B + i)
        if loss_type == "ipo":
            distil += (h - 1 / (2 * beta)) ** 2
        elif loss_type == "dpop":
            distil += -log_sigmoid(beta * h) + lam * max(0.0, -ratio(i))
        else:
            distil += -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    return (1 - kd_ratio) * nll + kd_ratio * distil / B


@pytest.mark.parametrize("options,kwargs", [
    ({}, {}),
    ({"beta": 0.5, "kd_ratio": 1.0}, {"beta": 0.5, "kd_ratio": 1.0}),
    ({"label_smoothing": 0.2}, {"eps": 0.2}),
    ({"loss_type": "ipo", "beta": 0.5}, {"loss_type": "ipo", "beta": 0.5}),
    ({"loss_type": "dpop", "dpop_lambda": 2.0}, {"loss_type": "dpop", "lam": 2.0}),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_form_matches_the_loop_reference(seed, options, kwargs):
    """Ragged answers (lengths 4, 2 | 3, 1); the gradient reaches the student only through log π_θ of the answers."""
    batch = make_batch(seed)
    out = run(batch, form="sequence", **options)
    want = sequence_reference(batch, **kwargs)
    assert abs(out.loss.item() - want) < 1e-6 * max(1.0, abs(want))
    assert out.margins is not None and out.margins.shape == (B,)


def test_sequence_form_gradient_is_the_dpo_gradient_with_the_teacher_as_reference():
    """∂L/∂log π_θ(y_t) = kd_ratio·(−σ(−βh)·β)·(±1)/B on the answers' tokens (+ the CE part on the chosen)."""
    batch = make_batch(7)
    batch.logits = None  # form=sequence does not need the student logits, only the log-probs of the answers
    out = run(batch, form="sequence", kd_ratio=1.0, beta=0.3)
    out.loss.backward()
    t = torch.log_softmax(batch.teacher_logits, -1).gather(-1, batch.token_ids.unsqueeze(-1)).squeeze(-1)
    ratio = ((batch.logps.detach() - t) * batch.mask).sum(-1)
    h = ratio[:B] - ratio[B:]
    coef = -torch.sigmoid(-0.3 * h) * 0.3 / B
    want = torch.zeros_like(batch.logps)
    for i in range(B):
        want[i, : LENGTHS[i]] = coef[i]
        want[B + i, : LENGTHS[B + i]] = -coef[i]
    torch.testing.assert_close(batch.logps.grad, want, rtol=1e-5, atol=1e-8)


def test_sequence_form_needs_rollouts_of_both_models():
    cls = LOSSES.get("dpkd")
    needs = cls().needs(build_config(cls, {"form": "sequence", "max_new_tokens": 16}))
    assert needs.chosen_from == "teacher" and needs.rejected_from == "student" and needs.teacher_logits
    assert needs.rollout_max_new_tokens == 16 and not needs.student_logits and not needs.reference
    token = cls().needs(build_config(cls, {}))
    assert token.chosen_from is None and token.rejected_from is None and token.student_logits
    for bad, key in (({"form": "pair"}, "form"), ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(ConfigError, match=f"dpkd: {key}"):
            build_config(cls, bad)
    batch = make_batch(8, teacher_rows=V - 2)
    batch.token_ids[0, 0] = V - 1  # a token the teacher has no logit row for
    with pytest.raises(ValueError, match="outside the teacher"):
        run(batch, form="sequence")


def test_sequence_form_runs_end_to_end_on_both_rollouts(tiny_world, tmp_path):
    import numpy as np

    from tvkd.config import config_from_dict
    from tvkd.pipeline import execute
    from tvkd.results import ResultsStore

    cfg = config_from_dict({
        "name": "dpkd-seq", "num_threads": 1,
        "models": {"student": tiny_world["student"], "teacher": tiny_world["teacher"]},
        "data": {"source": tiny_world["data"], "test_source": tiny_world["data"], "test_split": "train",
                 "test_limit": 4},
        "tokenize": {"max_length": 32, "max_prompt_length": 16},
        "loss": {"name": "dpkd", "form": "sequence", "max_new_tokens": 5},
        "train": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4},
        "eval": {"max_new_tokens": 3, "teacher_scores": False},
    })
    rec = execute(cfg, store=ResultsStore(tmp_path / "results"), progress=False)
    assert rec.complete and np.isfinite(rec.metrics["train_loss"])
    assert len(list((tmp_path / "cache" / "rollouts").glob("*/data"))) == 2  # the teacher's and the student's
