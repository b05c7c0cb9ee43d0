"""ADPA against a loop reference written from docs/methods.md §B.3, and end to end on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tvkd.api import LOSSES, ScoredBatch, build_config

B, T, V, K = 2, 4, 9, 3


def reference(z, t_ids, t_lp, r_ids, r_lp, logps, mask, clamp=True, beta=1.0, fallback="teacher_min",
              sft=1.0, w=1.6):
    """Float64 loops over (row, position, bin)."""
    ce_sum, ce_n, adv_sum, adv_n = 0.0, 0, 0.0, 0
    for r in range(B):  # chosen rows: CE
        for t in range(T):
            if mask[r, t]:
                ce_sum -= float(logps[r, t])
                ce_n += 1
    for r in range(B, 2 * B):  # rejected rows: the student's rollouts
        for t in range(T):
            if not mask[r, t]:
                continue
            zz = [float(x) for x in z[r, t]]
            m = max(zz)
            den = sum(math.exp(x - m) for x in zz)
            q = [math.exp(x - m) / den for x in zz]
            pa = [math.exp(float(x)) for x in t_lp[r, t]]
            pb = {int(i): math.exp(float(x)) for i, x in zip(r_ids[r, t], r_lp[r, t])}
            total, mass = 0.0, 0.0
            for k in range(K):
                a = int(t_ids[r, t, k])
                if a in pb:
                    b = pb[a]
                else:
                    b = min(pa) if fallback == "teacher_min" else min(pb.values())
                adv = math.log(max(pa[k], 1e-7)) - math.log(max(b, 1e-7))
                if clamp:
                    adv = min(max(adv, 1e-8), 1 - 1e-8)
                total += q[a] * adv
                mass += q[a]
            if clamp:
                total += max(1.0 - mass, 0.0) * 1e-8  # the rest bin: advantage 0, clamped to 1e-8
            else:
                total *= beta
            adv_sum += total
            adv_n += 1
    return sft * ce_sum / ce_n + w * (-adv_sum / adv_n)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * B, T, V, generator=g) * 2
    lengths = torch.tensor([4, 2, 3, 4])
    mask = torch.arange(T)[None] < lengths[:, None]
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    logps = torch.log_softmax(z, -1).gather(-1, ids[..., None])[..., 0] * mask
    teacher = torch.log_softmax(torch.randn(2 * B, T, V, generator=g) * 2, -1).topk(K, -1)
    tref = torch.log_softmax(torch.randn(2 * B, T, V, generator=g) * 2, -1).topk(K, -1)
    cols = {"topk_ids": teacher.indices, "topk_logprobs": teacher.values, "tref:topk_ids": tref.indices,
            "tref:topk_logprobs": tref.values}
    return ScoredBatch(logps=logps, mask=mask, logits=z.requires_grad_(), columns=cols, token_ids=ids)


@pytest.mark.parametrize("opts", [{}, {"clamp": False, "beta": 0.5}, {"fallback": "reference_min"},
                                  {"sft_weight": 0.0, "adpa_weight": 1.0}])
def test_matches_loop_reference(opts):
    batch = _batch(1)
    cfg = build_config(LOSSES.get("adpa"), {"topk": K, **opts})
    got = LOSSES.get("adpa")()(batch, cfg).loss.item()
    c = batch.columns
    want = reference(batch.logits.detach().double().numpy(), c["topk_ids"].numpy(), c["topk_logprobs"].double().numpy(),
                     c["tref:topk_ids"].numpy(), c["tref:topk_logprobs"].double().numpy(),
                     batch.logps.double().numpy(), batch.mask.numpy(), clamp=cfg.clamp, beta=cfg.beta,
                     fallback=cfg.fallback, sft=cfg.sft_weight, w=cfg.adpa_weight)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_needs_and_flags():
    cls = LOSSES.get("adpa")
    needs = cls().needs(build_config(cls, {}))
    assert needs.rejected_from == "student" and needs.topk == 50 and needs.teacher_reference_topk == 50
    assert not needs.reference
    assert cls().needs(build_config(cls, {"importance_sampling": True})).reference
    with pytest.raises(ValueError, match="adpa: fallback"):
        build_config(cls, {"fallback": "min"})


def test_runs_end_to_end_on_the_student_rollouts(tiny_world, tmp_path):
    from tvkd.config import config_from_dict
    from tvkd.pipeline import execute
    from tvkd.results import ResultsStore

    cfg = config_from_dict({
        "name": "adpa", "num_threads": 1,
        "models": {"student": tiny_world["student"], "teacher": tiny_world["teacher"],
                   "teacher_reference": tiny_world["student"]},
        "data": {"source": tiny_world["data"], "test_source": tiny_world["data"], "test_split": "train",
                 "test_limit": 4},
        "tokenize": {"max_length": 32, "max_prompt_length": 16},
        "loss": {"name": "adpa", "topk": 4, "max_new_tokens": 5},
        "train": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4},
        "eval": {"max_new_tokens": 3},
    })
    rec = execute(cfg, store=ResultsStore(tmp_path / "results"), progress=False)
    assert rec.complete and np.isfinite(rec.metrics["train_loss"])
    assert len(list((tmp_path / "cache" / "rollouts").glob("*/data"))) == 1


def test_without_a_teacher_reference_fails_before_any_model_loads(tiny_world, tmp_path):
    from tvkd.config import config_from_dict
    from tvkd.pipeline import InputError, plan_run

    cfg = config_from_dict({"models": {"student": tiny_world["student"], "teacher": tiny_world["teacher"]},
                            "data": {"source": tiny_world["data"]}, "loss": {"name": "adpa"}})
    with pytest.raises(InputError, match="adpa.*teacher_reference"):
        plan_run(cfg, progress=False)
