"""ADPA against a loop reference written from docs/methods.md §B.3, and end to end on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tvkd.api import LOSSES, ScoredBatch, build_config

B, T, V, K = 2, 4, 9, 3


def reference(z, t_ids, t_lp, r_ids, r_lp, logps, mask, clamp=True, beta=1.0, fallback="teacher_min",
              sft=1.0, w=1.6, eos_entry=True, weights=None):
    """Float64 loops over (row, position, bin), in the official code's form (`get_reverse_ce`).

    Per position of y_s: Σ_k clamp(q_k)·clamp(Ã_k) over the k+1 bins, q the student's softmax at the
    teacher's top-k ids and the rest 1 − Σ; without an EOS entry (official cache) the last position's
    bins are all 0, clamped to 1e-8. The ADPA term is the token mean pooled over every y_s token;
    `weights` (importance sampling) multiply that pooled term, then average: mean_i(term · w_i).
    """
    ce_sum, ce_n, adv_sum, adv_n = 0.0, 0, 0.0, 0
    for r in range(B):  # chosen rows: CE
        for t in range(T):
            if mask[r, t]:
                ce_sum -= float(logps[r, t])
                ce_n += 1
    for r in range(B, 2 * B):  # rejected rows: the student's rollouts
        n = int(mask[r].sum())
        for t in range(n):
            adv_n += 1
            if not eos_entry and t == n - 1:
                adv_sum += (K + 1) * 1e-16 if clamp else 0.0
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
                    total += min(max(q[a], 1e-8), 1 - 1e-8) * min(max(adv, 1e-8), 1 - 1e-8)
                else:
                    total += q[a] * adv
                mass += q[a]
            if clamp:
                total += min(max(1.0 - mass, 1e-8), 1 - 1e-8) * 1e-8  # the rest bin: advantage 0, clamped to 1e-8
            else:
                total *= beta
            adv_sum += total
    term = -adv_sum / adv_n
    if weights is not None:
        term = sum(term * wi for wi in weights) / len(weights)
    return sft * ce_sum / ce_n + w * term


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
                                  {"sft_weight": 0.0, "adpa_weight": 1.0}, {"eos_entry": False},
                                  {"eos_entry": False, "clamp": False}])
def test_matches_loop_reference(opts):
    batch = _batch(1)
    cfg = build_config(LOSSES.get("adpa"), {"topk": K, **opts})
    got = LOSSES.get("adpa")()(batch, cfg).loss.item()
    c = batch.columns
    want = reference(batch.logits.detach().double().numpy(), c["topk_ids"].numpy(), c["topk_logprobs"].double().numpy(),
                     c["tref:topk_ids"].numpy(), c["tref:topk_logprobs"].double().numpy(),
                     batch.logps.double().numpy(), batch.mask.numpy(), clamp=cfg.clamp, beta=cfg.beta,
                     fallback=cfg.fallback, sft=cfg.sft_weight, w=cfg.adpa_weight, eos_entry=cfg.eos_entry)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def _ratios(batch, seed):
    g = torch.Generator().manual_seed(seed)
    batch.ref_logps = (batch.logps.detach() + 0.3 * torch.randn(2 * B, T, generator=g)) * batch.mask
    _, delta = batch.log_ratios(include_reference=True)
    return [math.exp(float(d)) for d in delta.detach()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_importance_sampling_is_the_official_pooled_form_on_ragged_answers(seed):
    """mean_i(pooled token mean · w_i), not mean_i(w_i · token mean of answer i): they differ on ragged y_s."""
    batch = _batch(seed)  # y_s lengths 3 and 4: ragged
    weights = _ratios(batch, seed)
    cls = LOSSES.get("adpa")
    cfg = build_config(cls, {"topk": K, "importance_sampling": True, "sft_weight": 0.0, "adpa_weight": 1.0})
    got = cls()(batch, cfg).loss.item()
    c = batch.columns
    args = (batch.logits.detach().double().numpy(), c["topk_ids"].numpy(), c["topk_logprobs"].double().numpy(),
            c["tref:topk_ids"].numpy(), c["tref:topk_logprobs"].double().numpy(), batch.logps.double().numpy(),
            batch.mask.numpy())
    want = reference(*args, sft=0.0, w=1.0, weights=weights)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    # the per-sequence reading, for contrast: its own loop, and far from the official value
    per_seq = 0.0
    for i, r in enumerate(range(B, 2 * B)):
        one = batch.mask.clone()
        one[B:] = False
        one[r] = batch.mask[r]
        per_seq += weights[i] * reference(*args[:-1], one, sft=0.0, w=1.0)
    assert abs(per_seq / B - want) > 1e-4 * abs(want)


def test_importance_weight_is_not_detached():
    batch = _batch(3)
    batch.logps.requires_grad_()
    _ratios(batch, 3)
    cls = LOSSES.get("adpa")
    cfg = build_config(cls, {"topk": K, "importance_sampling": True, "sft_weight": 0.0})
    cls()(batch, cfg).loss.backward()
    assert batch.logps.grad[B:].abs().sum() > 0  # through w_i = exp(Σ log π_θ − Σ log π_ref)


def test_eos_entry_false_drops_only_the_eos_advantage():
    batch = _batch(4)
    cls = LOSSES.get("adpa")
    on = cls()(batch, build_config(cls, {"topk": K, "sft_weight": 0.0, "adpa_weight": 1.0})).loss
    off = cls()(batch, build_config(cls, {"topk": K, "sft_weight": 0.0, "adpa_weight": 1.0, "eos_entry": False}))
    assert abs(on.item() - off.loss.item()) > 1e-4  # the real EOS entries counted
    off.loss.backward()  # the official empty EOS entry is a constant: no gradient there
    _, mask = batch.split(batch.mask)
    lengths = mask.sum(-1)
    grad = batch.logits.grad[B:]
    for i in range(B):
        assert grad[i, int(lengths[i]) - 1].abs().max() == 0
        assert grad[i, 0].abs().max() > 0


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
