"""`odpo` against a float64 loop reference (docs/methods.md §A.7): offsets, non-positive gaps, meta keys, α = 0."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from datasets import Dataset

from tvkd.api import LOSSES, ConfigError, ScoredBatch, build_config

B, BETA, BETA_T = 3, 0.1, 0.05
# Per-token log π_T and log π_Tref (chosen rows, then rejected rows): r_T gaps are β_T·(0.9, 0.2, −1.3).
TEACHER = [[-0.5, -1.2, -0.1], [-2.0, -0.3], [-0.7], [-1.1, -0.8], [-0.4, -0.9, -1.3], [-0.6, -0.3]]
TREF = [[-0.9, -1.0, -0.4], [-1.5, -0.6], [-0.2], [-0.6, -0.9], [-0.5, -0.7, -1.0], [-0.9, -0.8]]
LENGTHS = [len(r) for r in TEACHER]
METAS = [{"helpfulness_gap": 2, "oracle_chosen": 0.9, "oracle_rejected": 0.4},
         {"helpfulness_gap": 1, "oracle_chosen": 0.3, "oracle_rejected": 0.3},
         {"helpfulness_gap": 3, "oracle_chosen": 0.1, "oracle_rejected": 0.6}]


def dataset() -> Dataset:
    return Dataset.from_dict({
        "id": [f"p{i}" for i in range(B)], "meta": [json.dumps(m) for m in METAS],
        "chosen/log_prob": TEACHER[:B], "rejected/log_prob": TEACHER[B:],
        "chosen/tref:log_prob": TREF[:B], "rejected/tref:log_prob": TREF[B:],
    })


def student_batch(columns: dict) -> ScoredBatch:
    g = torch.Generator().manual_seed(0)
    T = max(LENGTHS)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    logps = (-torch.rand(2 * B, T, generator=g) * 3 * mask).requires_grad_(True)
    ref_logps = -torch.rand(2 * B, T, generator=g) * 3 * mask
    return ScoredBatch(logps=logps, mask=mask, ref_logps=ref_logps, columns=columns)


def run(name: str, options: dict):
    cls = LOSSES.get(name)
    cfg = build_config(cls, options)
    cols = cls().batch_columns(cfg)
    prepared = cls().prepare(dataset(), cfg, seed=0) if cols else None
    batch = student_batch({c: torch.tensor(prepared[c]) for c in cols})
    return prepared, batch, cls()(batch, cfg)


def loop_gaps(source: str) -> list[float]:
    if source == "teacher":
        r = [BETA_T * sum(t - q for t, q in zip(TEACHER[i], TREF[i])) for i in range(2 * B)]
        return [r[i] - r[B + i] for i in range(B)]
    if source == "data:helpfulness_gap":
        return [float(m["helpfulness_gap"]) for m in METAS]
    return [m["oracle_chosen"] - m["oracle_rejected"] for m in METAS]


def loop_loss(batch: ScoredBatch, gaps: list[float], alpha: float, min_gap: float) -> float:
    lp, ref = batch.logps.detach().double().tolist(), batch.ref_logps.double().tolist()
    delta = [sum(lp[r][t] - ref[r][t] for t in range(LENGTHS[r])) for r in range(2 * B)]
    total, kept = 0.0, 0
    for i in range(B):
        gap = max(gaps[i], min_gap) if min_gap > 0 else gaps[i]
        if gap <= 0:
            continue  # undefined: dropped
        z = BETA * (delta[i] - delta[B + i]) - alpha * math.log(gap)
        total += math.log1p(math.exp(-z))
        kept += 1
    return total / kept


@pytest.mark.parametrize("source", ["teacher", "data:helpfulness_gap", "data:oracle_chosen,oracle_rejected"])
@pytest.mark.parametrize("min_gap", [0.0, 0.02])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_odpo_matches_loop(source, min_gap, alpha, caplog):
    with caplog.at_level(logging.WARNING, logger="baselines.odpo"):
        prepared, batch, out = run("odpo", {"offset_source": source, "min_gap": min_gap, "alpha": alpha, "beta": BETA})
    gaps = loop_gaps(source)
    assert max(abs(a - b) for a, b in zip(prepared["odpo_gap"], gaps)) < 1e-12
    bad = sum(g <= 0 for g in gaps)
    if min_gap == 0:
        assert list(prepared["odpo_weight"]) == [float(g > 0) for g in gaps]
        assert out.metrics["odpo/dropped_fraction"].item() == pytest.approx(bad / B)
    else:
        assert list(prepared["odpo_weight"]) == [1.0] * B
        assert max(abs(a - math.log(max(g, min_gap))) for a, g in zip(prepared["odpo_offset"], gaps)) < 1e-12
    assert (f"{bad} of {B} pairs have r_w - r_l <= 0" in caplog.text) == (bad > 0)
    assert abs(out.loss.item() - loop_loss(batch, gaps, alpha, min_gap)) < 1e-6


def test_dropped_pairs_get_no_gradient():
    _, batch, out = run("odpo", {})  # teacher gaps: pair 2 is dropped
    out.loss.backward()
    assert torch.all(batch.logps.grad[[2, B + 2]] == 0) and batch.logps.grad[[0, 1]].abs().sum() > 0


def test_odpo_with_alpha_zero_is_dpo():
    _, batch, out = run("odpo", {"alpha": 0.0, "offset_source": "data:helpfulness_gap", "beta": 0.3})
    _, dpo_batch, dpo = run("dpo", {"beta": 0.3})
    out.loss.backward()
    dpo.loss.backward()
    torch.testing.assert_close(out.loss, dpo.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(batch.logps.grad, dpo_batch.logps.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.margins, dpo.margins, rtol=0, atol=0)


def test_odpo_needs_and_settings():
    cls = LOSSES.get("odpo")
    teacher = cls().needs(build_config(cls, {}))
    assert teacher.reference and teacher.teacher and teacher.teacher_reference
    data = cls().needs(build_config(cls, {"offset_source": "data:helpfulness_gap"}))
    assert data.reference and not data.teacher and not data.teacher_reference
    settings = cls().eval_settings(build_config(cls, {"beta": 0.2}))
    assert settings.implicit_reward_beta == 0.2 and settings.offset_column == "odpo_gap"


def test_odpo_errors():
    cls = LOSSES.get("odpo")
    cfg = build_config(cls, {"offset_source": "data:helpfulness"})
    with pytest.raises(ValueError, match=r"meta key 'helpfulness', but row 0 \(id 'p0'\) has no such key; "
                                         r"its meta keys are \['helpfulness_gap', 'oracle_chosen'"):
        cls().prepare(dataset(), cfg, seed=0)
    with pytest.raises(ValueError, match="lacks"):
        cls().prepare(dataset().remove_columns("meta"), cfg, seed=0)
    for bad, option in [({"offset_source": "rm"}, "offset_source"), ({"offset_source": "data:a,b,c"}, "offset_source"),
                        ({"min_gap": -1.0}, "min_gap"), ({"alpha": -0.5}, "alpha")]:
        with pytest.raises(ConfigError, match=f"odpo: {option}"):
            build_config(cls, bad)
