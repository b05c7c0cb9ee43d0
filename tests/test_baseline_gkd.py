"""GKD: the generalized JSD against a loop reference and against TRL's `generalized_jsd_loss`; the
on-policy step replaces responses with student samples; end to end on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from baselines.gkd import generalized_jsd
from tvkd.api import LOSSES, ScoredBatch, build_config

B, T, V = 2, 4, 7


def jsd_loop(s: np.ndarray, t: np.ndarray, beta: float) -> float:
    """JSD_β of one position in float64 from the GKD paper's definition."""
    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    q, p = softmax(s), softmax(t)
    if beta == 0:
        return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    if beta == 1:
        return float(sum(qi * math.log(qi / pi) for pi, qi in zip(p, q)))
    m = beta * p + (1 - beta) * q
    return float(beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m))
                 + (1 - beta) * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m)))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * B, T, V, generator=g) * 2
    zt = torch.randn(2 * B, T, V, generator=g) * 2
    mask = torch.arange(T)[None] < torch.tensor([4, 2, 3, 1])[:, None]
    return ScoredBatch(logps=torch.zeros(2 * B, T), mask=mask, logits=z.requires_grad_(), teacher_logits=zt)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_loss_matches_loop_reference(beta):
    batch = _batch(1)
    cfg = build_config(LOSSES.get("gkd"), {"beta": beta})
    got = LOSSES.get("gkd")()(batch, cfg).loss.item()
    z, zt = batch.logits.detach().double().numpy(), batch.teacher_logits.double().numpy()
    vals = [jsd_loop(z[r, t], zt[r, t], beta) for r in range(B) for t in range(T) if batch.mask[r, t]]
    assert got == pytest.approx(sum(vals) / len(vals), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_equals_trl_generalized_jsd(beta):
    gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 3:] = -100
    labels[2, :2] = -100
    want = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=1.0)
    mask = labels != -100
    got = (generalized_jsd(s, t, beta) * mask).sum() / mask.sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_needs_online_teacher_and_on_policy_samples():
    cls = LOSSES.get("gkd")
    needs = cls().needs(build_config(cls, {}))
    assert needs.teacher_logits and needs.student_logits and not needs.reference
    assert needs.on_policy.fraction == 0.5 and needs.on_policy.temperature == 0.9
    assert cls().needs(build_config(cls, {"lmbda": 0.0})).on_policy is None
    with pytest.raises(ValueError, match="gkd: beta"):
        build_config(cls, {"beta": 2.0})


def test_runs_end_to_end_with_on_policy_steps(tiny_world, tmp_path):
    from tvkd.config import config_from_dict
    from tvkd.pipeline import execute
    from tvkd.results import ResultsStore

    cfg = config_from_dict({
        "name": "gkd", "num_threads": 1,
        "models": {"student": tiny_world["student"], "teacher": tiny_world["teacher"]},
        "data": {"source": tiny_world["data"], "test_source": tiny_world["data"], "test_split": "train",
                 "test_limit": 4},
        "tokenize": {"max_length": 32, "max_prompt_length": 16},
        "loss": {"name": "gkd", "lmbda": 1.0, "max_new_tokens": 4},
        "train": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4, "logging_steps": 1},
        "eval": {"max_new_tokens": 3, "teacher_scores": False},
    })
    rec = execute(cfg, store=ResultsStore(tmp_path / "results"), progress=False)
    assert rec.complete and np.isfinite(rec.metrics["train_loss"])
    assert rec.metrics["train_log_last"]["on_policy"] == 1.0  # every step trained on the student's samples
