"""`ddpo` against a float64 loop reference (docs/methods.md §A.5, §B.4.7): targets, loss and gradient."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from tvkd.api import LOSSES, ConfigError, ScoredBatch, build_config

BETA, BETA_T = 0.1, 0.05
# Three pairs, per-token log π_T and log π_Tref of each response (chosen rows, then rejected rows).
TEACHER = [[-0.5, -1.2, -0.1], [-2.0, -0.3], [-0.7], [-1.1, -0.8], [-0.4, -0.9, -1.3], [-0.6, -0.3]]
TREF = [[-0.9, -1.0, -0.4], [-1.5, -0.6], [-0.2], [-0.6, -0.9], [-0.5, -0.7, -1.0], [-0.9, -0.8]]
B = 3
LENGTHS = [len(r) for r in TEACHER]


def teacher_dataset() -> Dataset:
    return Dataset.from_dict({
        "id": [f"p{i}" for i in range(B)],
        "chosen/log_prob": TEACHER[:B], "rejected/log_prob": TEACHER[B:],
        "chosen/tref:log_prob": TREF[:B], "rejected/tref:log_prob": TREF[B:],
    })


def student_batch(columns: dict, seed: int = 0) -> ScoredBatch:
    g = torch.Generator().manual_seed(seed)
    T = max(LENGTHS)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    logps = (-torch.rand(2 * B, T, generator=g) * 3 * mask).requires_grad_(True)
    ref_logps = -torch.rand(2 * B, T, generator=g) * 3 * mask
    return ScoredBatch(logps=logps, mask=mask, ref_logps=ref_logps, columns=columns)


def loop_targets(beta_t: float) -> list[float]:
    reward = [beta_t * sum(t - r for t, r in zip(TEACHER[i], TREF[i])) for i in range(2 * B)]
    return [reward[i] - reward[B + i] for i in range(B)]


def loop_deltas(batch: ScoredBatch) -> list[float]:
    lp, ref = batch.logps.detach().double().tolist(), batch.ref_logps.double().tolist()
    delta = [sum(lp[r][t] - ref[r][t] for t in range(LENGTHS[r])) for r in range(2 * B)]
    return [delta[i] - delta[B + i] for i in range(B)]


def run(options: dict, dataset: Dataset | None = None):
    cls = LOSSES.get("ddpo")
    cfg = build_config(cls, options)
    prepared = cls().prepare(dataset or teacher_dataset(), cfg, seed=0)
    batch = student_batch({"ddpo_target": torch.tensor(prepared["ddpo_target"])})
    return prepared, batch, cls()(batch, cfg)


@pytest.mark.parametrize("beta,beta_t", [(BETA, BETA_T), (0.5, 1.0)])
def test_ddpo_matches_loop(beta, beta_t):
    prepared, batch, out = run({"beta": beta, "teacher_beta": beta_t})
    targets = loop_targets(beta_t)
    assert max(abs(a - b) for a, b in zip(prepared["ddpo_target"], targets)) < 1e-12
    h = loop_deltas(batch)
    want = sum((beta * h[i] - targets[i]) ** 2 for i in range(B)) / B
    assert abs(out.loss.item() - want) < 1e-6
    assert torch.allclose(out.margins.double(), beta * torch.tensor(h, dtype=torch.float64), atol=1e-6)


def test_ddpo_gradient_is_twice_the_residual():
    """∇L = 2·(βΔ − target)·β·(∇Δ_w − ∇Δ_l) / B, with ∂Δ_i/∂logps[i, t] = mask."""
    _, batch, out = run({"beta": BETA})
    out.loss.backward()
    h, targets = loop_deltas(batch), loop_targets(BETA_T)
    want = torch.zeros_like(batch.logps, dtype=torch.float64)
    for i in range(B):
        coef = 2 * (BETA * h[i] - targets[i]) * BETA / B
        want[i, : LENGTHS[i]] = coef
        want[B + i, : LENGTHS[B + i]] = -coef
    torch.testing.assert_close(batch.logps.grad.double(), want, rtol=1e-5, atol=1e-9)


def test_ddpo_data_targets_and_needs():
    metas = [{"rm_w": 2.5, "rm_l": 1.0, "gap": 3}, {"rm_w": 0.0, "rm_l": 0.5, "gap": 1}, {"rm_w": 1, "rm_l": 1, "gap": 2}]
    ds = Dataset.from_dict({"id": ["a", "b", "c"], "meta": [json.dumps(m) for m in metas]})
    cls = LOSSES.get("ddpo")
    for source, want in (("data:rm_w,rm_l", [1.5, -0.5, 0.0]), ("data:gap", [3.0, 1.0, 2.0])):
        cfg = build_config(cls, {"target_source": source})
        assert not cls().needs(cfg).teacher and not cls().needs(cfg).teacher_reference
        assert list(cls().prepare(ds, cfg, seed=0)["ddpo_target"]) == want
        assert cls().eval_settings(cfg).offset_column is None
    assert build_config(cls, {}).beta == 0.01  # docs/methods.md §A.5
    needs = cls().needs(build_config(cls, {}))
    assert [s.column for s in needs.aux] == ["log_prob"] and [s.column for s in needs.teacher_reference_aux] == ["log_prob"]
    assert cls().eval_settings(build_config(cls, {"beta": 0.3})).implicit_reward_beta == 0.3


def test_ddpo_errors():
    cls = LOSSES.get("ddpo")
    with pytest.raises(ConfigError, match="ddpo: target_source"):
        build_config(cls, {"target_source": "rm"})
    with pytest.raises(ConfigError, match="ddpo: teacher_beta"):
        build_config(cls, {"teacher_beta": 0.0})
    with pytest.raises(ValueError, match="teacher-reference cache columns"):
        cls().prepare(Dataset.from_dict({"chosen/log_prob": [[0.0]]}), build_config(cls, {}), seed=0)
    with pytest.raises(ValueError, match="ddpo_target"):
        cls()(student_batch({}), build_config(cls, {}))
