"""Aux rewards (docs/methods.md §A.2) against direct per-row numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tvkd.api import AuxSpec
from tvkd.aux_rewards import (
    AUX_REWARDS,
    TABLE5,
    LogitStats,
    aux_reward,
    compute_aux,
    make_spec,
    reference_value,
)
from tvkd.registry import UnknownNameError
from tvkd.shaping import shaping_sum

N, V = 9, 17


def _logits(seed: int = 0, shape=(N, V), scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _ids(seed: int = 1, shape=(N,), vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def reference(name: str, row: np.ndarray, a: int | None, q_source: str, beta_v: float | None) -> float:
    """One of Table 5's aux rewards at one state, written out in float64 with Python loops.

    Independent of the float64 references the aux modules register (`test_registered_reference`
    checks those against this one for the six of the paper; a new aux reward is checked against
    its own)."""
    z = [float(x) for x in row]
    m = max(z)
    log_z = m + math.log(sum(math.exp(x - m) for x in z))
    pi = [math.exp(x - log_z) for x in z]
    q = z if q_source == "logits" else [x - log_z for x in z]
    if name == "logits":
        return q[a]
    if name == "log_prob":
        return z[a] - log_z
    if name == "max":
        return max(pi)
    if name == "margin":
        p = sorted(pi, reverse=True)
        return p[0] - p[1]
    if name == "expectation":
        return sum(p * qq for p, qq in zip(pi, q))
    if name == "soft_value":
        mq = max(x / beta_v for x in q)
        return beta_v * (mq + math.log(sum(math.exp(x / beta_v - mq) for x in q)))
    raise AssertionError(name)


def _expected(spec: AuxSpec, z: torch.Tensor, ids: torch.Tensor, registered: bool = False) -> np.ndarray:
    zz = z.double().numpy().reshape(-1, z.shape[-1])
    aa = ids.reshape(-1).tolist()
    if registered or spec.name not in TABLE5:
        out = [reference_value(spec, zz[i], aa[i]) for i in range(len(zz))]
    else:
        out = [reference(spec.name, zz[i], aa[i], spec.q_source, spec.temperature) for i in range(len(zz))]
    return np.array(out).reshape(tuple(z.shape[:-1]))


ALL_SPECS = [
    make_spec(name, q_source=qs, temperature=t)
    for name in AUX_REWARDS.names()
    for qs in ("logits", "logprobs")
    for t in (0.5, 1.0, 2.0)
]


def test_registry_has_table_5():
    kinds = {name: AUX_REWARDS.meta(name)["kind"] for name in TABLE5}
    assert kinds == {
        "logits": "action",
        "log_prob": "action",
        "max": "state",
        "margin": "state",
        "expectation": "state",
        "soft_value": "state",
    }
    for name in TABLE5:
        assert AUX_REWARDS.meta(name)["uses_temperature"] is (name == "soft_value")


@pytest.mark.parametrize("name", AUX_REWARDS.names())
def test_registered_with_metadata(name):
    meta = AUX_REWARDS.meta(name)
    assert meta["kind"] in ("action", "state")
    assert isinstance(meta["formula"], str) and meta["formula"]
    assert isinstance(meta["uses_temperature"], bool) and isinstance(meta["uses_q"], bool)
    assert callable(meta["reference"])
    fn = AUX_REWARDS.get(name)
    assert fn.__doc__ and __import__(fn.__module__, fromlist=["x"]).__doc__


@pytest.mark.parametrize("spec", sorted({s for s in ALL_SPECS if s.name in TABLE5}, key=lambda s: s.column),
                         ids=lambda s: s.column)
def test_registered_reference(spec):
    """The float64 reference each of the paper's aux modules registers equals this file's loop version."""
    z, ids = _logits(15), _ids(16)
    np.testing.assert_allclose(_expected(spec, z, ids, registered=True), _expected(spec, z, ids), rtol=1e-12,
                               atol=1e-12)


def test_unknown_aux_name_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'soft_value'"):
        AUX_REWARDS.get("soft_valu")


@pytest.mark.parametrize("spec", sorted(set(ALL_SPECS), key=lambda s: s.column), ids=lambda s: s.column)
def test_matches_loop_reference(spec):
    z, ids = _logits(), _ids()
    got = aux_reward(spec, z, ids)
    assert got.dtype == torch.float32 and got.shape == (N,)
    np.testing.assert_allclose(got.double().numpy(), _expected(spec, z, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", AUX_REWARDS.names())
def test_leading_dims(name):
    spec = make_spec(name, temperature=2.0)
    z, ids = _logits(3, shape=(2, 3, V)), _ids(4, shape=(2, 3))
    got = aux_reward(spec, z, ids)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got.double().numpy(), _expected(spec, z, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", AUX_REWARDS.names())
def test_low_precision_input_computed_in_fp32(name, dtype):
    spec = make_spec(name, q_source="logprobs" if name == "expectation" else "logits", temperature=0.7)
    z = _logits(5).to(dtype)
    ids = _ids()
    got = aux_reward(spec, z, ids)
    assert got.dtype == torch.float32
    # exactly the fp32 computation on the upcast values, and close to float64 on them
    assert torch.equal(got, aux_reward(spec, z.float(), ids))
    np.testing.assert_allclose(got.double().numpy(), _expected(spec, z.float(), ids), rtol=1e-5, atol=1e-5)


def test_large_logits_are_stable():
    z = _logits(6) + 1e4  # a naive exp overflows
    for name in AUX_REWARDS:
        spec = make_spec(name, temperature=0.25)
        got = aux_reward(spec, z, _ids())
        assert torch.isfinite(got).all(), name


# --- q_source = logprobs ------------------------------------------------------------------


def test_logprob_soft_value_at_unit_temperature_is_identically_zero():
    z = _logits(7) * 5
    got = aux_reward(make_spec("soft_value", q_source="logprobs", temperature=1.0), z)
    assert torch.all(got == 0.0)


def test_logprob_soft_value_sign_flips_around_unit_temperature():
    z = _logits(8)
    for t, sign in [(0.25, -1), (0.5, -1), (0.9, -1), (1.1, 1), (2.0, 1), (8.0, 1)]:
        got = aux_reward(make_spec("soft_value", q_source="logprobs", temperature=t), z)
        assert torch.all(torch.sign(got) == sign), t
    # raw logits have no such pinned sign: shift z and the soft value shifts with it
    shifted = aux_reward(make_spec("soft_value", temperature=2.0), z + 100.0)
    assert torch.all(shifted > 90)


def test_logprob_source_relations():
    z, ids = _logits(9), _ids()
    pi = torch.softmax(z.double(), -1)
    ent = -(pi * pi.log()).sum(-1)
    exp_lp = aux_reward(make_spec("expectation", q_source="logprobs"), z)
    torch.testing.assert_close(exp_lp.double(), -ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        aux_reward(make_spec("logits", q_source="logprobs"), z, ids),
        aux_reward(make_spec("log_prob"), z, ids),
        rtol=1e-5,
        atol=1e-5,
    )
    # π-only rewards do not depend on the Q source: one canonical column
    for name in ("log_prob", "max", "margin"):
        assert make_spec(name, q_source="logprobs") == make_spec(name) == AuxSpec(name)


def test_make_spec_canonical_columns():
    assert make_spec("soft_value", temperature=2).column == "soft_value@2"
    assert make_spec("soft_value", q_source="logprobs", temperature=0.5).column == "soft_value[logprobs]@0.5"
    assert make_spec("expectation", temperature=2.0).column == "expectation"
    with pytest.raises(ValueError, match="temperature"):
        make_spec("soft_value")
    with pytest.raises(ValueError, match="q_source"):
        make_spec("max", q_source="probs")


def test_action_rewards_need_ids():
    with pytest.raises(ValueError, match="token ids"):
        aux_reward(make_spec("logits"), _logits())
    with pytest.raises(ValueError, match="next_ids"):
        compute_aux(_logits(), None, [make_spec("log_prob")])


# --- compute_aux ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 100])
def test_compute_aux_equals_per_spec_calls(chunk_size):
    z, ids = _logits(10).to(torch.bfloat16), _ids()
    specs = list(dict.fromkeys(ALL_SPECS))
    got = compute_aux(z, ids, specs, chunk_size=chunk_size)
    assert set(got) == {s.column for s in specs}
    for spec in specs:
        want = aux_reward(spec, z, ids)
        assert got[spec.column].shape == (N,) and got[spec.column].dtype == torch.float32
        torch.testing.assert_close(got[spec.column], want, rtol=1e-6, atol=1e-6)


def test_compute_aux_state_only_without_ids():
    z = _logits(11)
    specs = [make_spec("soft_value", temperature=2.0), make_spec("margin")]
    got = compute_aux(z, None, specs)
    np.testing.assert_allclose(got["margin"].double().numpy(), _expected(specs[1], z, _ids()), atol=1e-6)


def test_logit_stats_share_reductions():
    stats = LogitStats(_logits(12))
    assert stats.tempered_lse(1.0) is stats.lse
    assert stats.tempered_lse(2.0) is stats.tempered_lse(2.0)
    assert stats.top2 is stats.top2


@pytest.mark.parametrize("name", AUX_REWARDS.names())
def test_every_aux_reward_contract(name):
    """Finite, right shape, and (state kinds) potentials whose pbrs shaping telescopes."""
    spec = make_spec(name, temperature=2.0)
    z, ids = _logits(13, shape=(3, 6, V)), _ids(14, shape=(3, 6))
    values = aux_reward(spec, z, ids)
    assert values.shape == (3, 6) and torch.isfinite(values).all()
    if AUX_REWARDS.meta(name)["kind"] == "state":
        lengths = torch.tensor([5, 3, 1])  # 6 state columns hold T + 1 ≤ 6 potentials
        total = shaping_sum(values, lengths, "state", gamma=1.0, shaping="pbrs", terminal="teacher")
        want = values.gather(1, lengths[:, None]).squeeze(1) - values[:, 0]
        assert torch.equal(total, want)
