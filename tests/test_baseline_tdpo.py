"""`tdpo` against a float64 loop reference (docs/methods.md §B.4.4, §A.7): both variants, π_ref = π_θ, stop-gradient."""

from __future__ import annotations

import math

import pytest
import torch

from tvkd.api import LOSSES, ConfigError, ScoredBatch, build_config

B, V = 2, 5
LENGTHS = [3, 1, 2, 3]  # chosen rows, then rejected rows
T = max(LENGTHS) + 1  # one column of padding everywhere


def batch(same_reference: bool = False, seed: int = 0) -> ScoredBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    logits = torch.randn(2 * B, T, V, generator=g) * 2
    ref_logits = logits.clone() if same_reference else torch.randn(2 * B, T, V, generator=g) * 2
    logits[~mask] = 40.0  # garbage in the padding
    logps = -torch.rand(2 * B, T, generator=g) * 3 * mask
    ref_logps = -torch.rand(2 * B, T, generator=g) * 3 * mask
    return ScoredBatch(logps=logps.requires_grad_(True), mask=mask, ref_logps=ref_logps,
                       logits=logits.requires_grad_(True), ref_logits=ref_logits)


def log_softmax64(z: list[float]) -> list[float]:
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def loop_loss(b: ScoredBatch, beta: float, alpha: float, variant: int) -> float:
    logits, ref = b.logits.detach().double().tolist(), b.ref_logits.double().tolist()
    lp, ref_lp = b.logps.detach().double().tolist(), b.ref_logps.double().tolist()
    delta, seqkl = [], []
    for r, n in enumerate(LENGTHS):
        kl = 0.0
        for t in range(n):
            q, p = log_softmax64(logits[r][t]), log_softmax64(ref[r][t])
            kl += sum(math.exp(p[v]) * (p[v] - q[v]) for v in range(V))
        seqkl.append(kl)
        delta.append(sum(lp[r][t] - ref_lp[r][t] for t in range(n)))
    total = 0.0
    for i in range(B):
        h = delta[i] - delta[B + i]
        weight = 1.0 if variant == 1 else alpha
        z = h - weight * (seqkl[B + i] - seqkl[i])
        total += math.log1p(math.exp(-beta * z))
    return total / B


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("beta,alpha", [(0.1, 0.5), (1.0, 0.2)])
def test_tdpo_matches_loop(variant, beta, alpha):
    cls = LOSSES.get("tdpo")
    b = batch()
    out = cls()(b, build_config(cls, {"beta": beta, "alpha": alpha, "variant": variant}))
    assert abs(out.loss.item() - loop_loss(b, beta, alpha, variant)) < 1e-6


def test_tdpo_with_the_reference_as_policy_is_dpo():
    cls = LOSSES.get("tdpo")
    b, d = batch(same_reference=True), batch(same_reference=True)
    out = cls()(b, build_config(cls, {}))
    dpo = LOSSES.get("dpo")()(d, build_config(LOSSES.get("dpo"), {"beta": 0.1}))
    assert out.metrics["tdpo/seqkl_chosen"].item() == 0 and out.metrics["tdpo/seqkl_rejected"].item() == 0
    out.loss.backward()
    dpo.loss.backward()
    assert torch.equal(out.loss, dpo.loss) and torch.equal(out.margins, dpo.margins)
    assert torch.equal(b.logps.grad, d.logps.grad)
    assert b.logits.grad.abs().max() < 1e-7  # ∇KL = softmax(z_θ) − softmax(z_ref) = 0


def test_tdpo2_stops_the_chosen_kl_gradient():
    cls = LOSSES.get("tdpo")
    for variant in (1, 2):
        b = batch()
        cls()(b, build_config(cls, {"variant": variant})).loss.backward()
        chosen, rejected = b.logits.grad[:B], b.logits.grad[B:]
        assert rejected.abs().sum() > 0 and (chosen.abs().sum() == 0) == (variant == 2)
        assert torch.all(b.logits.grad[~b.mask] == 0)


def test_tdpo_config_and_needs():
    cls = LOSSES.get("tdpo")
    cfg = build_config(cls, {})
    assert (cfg.beta, cfg.alpha, cfg.variant) == (0.1, 0.5, 1)
    needs = cls().needs(cfg)
    assert needs.reference and needs.reference_logits and needs.student_logits and not needs.teacher
    assert cls().eval_settings(build_config(cls, {"beta": 0.3})).implicit_reward_beta == 0.3
    with pytest.raises(ConfigError, match="tdpo: variant"):
        build_config(cls, {"variant": 3})
    with pytest.raises(ConfigError, match="tdpo: beta"):
        build_config(cls, {"beta": 0.0})
    b = batch()
    b.ref_logits = None
    with pytest.raises(ValueError, match="reference logits"):
        cls()(b, cfg)
