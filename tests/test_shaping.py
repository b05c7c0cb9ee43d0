"""Per-token shaping and the pair offset (docs/methods.md §A.2, §A.3) against loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvkd.shaping import (
    pair_offset,
    pair_offset_rows,
    shaping_sum,
    shaping_sum_rows,
    shaping_terms,
)

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


def loop_terms(phi: list[float], kind: str, gamma: float, shaping: str, terminal: str) -> list[float]:
    """ψ_t for one response, straight from the definition (phi: T+1 potentials or T action values)."""
    if kind == "action":
        return list(phi)
    T = len(phi) - 1
    out = []
    for t in range(T):
        nxt = 0.0 if (terminal == "zero" and t + 1 == T) else phi[t + 1]
        psi = gamma * nxt
        if shaping == "pbrs":
            psi -= phi[t]
        out.append(psi)
    return out


def pad(rows: list[list[float]], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    out = torch.full((len(rows), width), fill, dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
    return out, torch.tensor([len(r) for r in rows])


def random_rows(rng: np.random.Generator, n: int, kind: str, max_t: int = 7) -> list[list[float]]:
    extra = 1 if kind == "state" else 0
    return [list(rng.normal(size=int(rng.integers(1, max_t + 1)) + extra) * 3) for _ in range(n)]


# --- telescoping ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=2, max_size=40))
def test_pbrs_unit_gamma_telescopes_exactly(phi):
    values = torch.tensor([phi], dtype=torch.float32)
    lengths = torch.tensor([len(phi) - 1])
    total = shaping_sum(values, lengths, "state", gamma=1.0, shaping="pbrs", terminal="teacher")
    assert torch.equal(total, values[:, -1] - values[:, 0])  # to the last bit
    # the per-token terms telescope too (up to the rounding of T additions)
    terms = shaping_terms(values.double(), lengths, "state", 1.0, "pbrs", "teacher")
    assert math.isclose(terms.sum().item(), phi[-1] - phi[0], rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite, min_size=2, max_size=30), st.lists(finite, min_size=2, max_size=30), finite, finite)
def test_pair_offset_cancels_start_potential(chosen, rejected, start_w, start_l):
    # Φ(s_0) is shared by the pair in truth; two differently rounded copies must not leak in
    chosen, rejected = [start_w] + chosen[1:], [start_l] + rejected[1:]
    cv, cl = pad([chosen])
    rv, rl = pad([rejected])
    got = pair_offset(cv, cl - 1, rv, rl - 1, "state", 1.0, "pbrs", "teacher")
    assert torch.equal(got, torch.tensor([chosen[-1] - rejected[-1]], dtype=torch.float64))
    zero = pair_offset(cv, cl - 1, rv, rl - 1, "state", 1.0, "pbrs", "zero")
    assert torch.equal(zero, torch.zeros(1, dtype=torch.float64))


# --- loop references -----------------------------------------------------------------------


CASES = [
    (kind, gamma, shaping, terminal)
    for kind in ("state",)
    for gamma in (1.0, 0.9, 0.5)
    for shaping in ("pbrs", "next_only")
    for terminal in ("teacher", "zero")
] + [("action", 1.0, "pbrs", "teacher")]


@pytest.mark.parametrize("kind,gamma,shaping,terminal", CASES)
def test_terms_and_sums_match_loop(kind, gamma, shaping, terminal):
    rng = np.random.default_rng(0)
    rows = random_rows(rng, 6, kind)
    values, sizes = pad(rows, fill=float("nan"))  # padding must never be read
    lengths = sizes - (1 if kind == "state" else 0)
    terms = shaping_terms(values, lengths, kind, gamma, shaping, terminal)
    width = values.shape[1] - (1 if kind == "state" else 0)
    assert terms.shape == (6, width)
    for i, row in enumerate(rows):
        want = loop_terms(row, kind, gamma, shaping, terminal)
        T = len(want)
        np.testing.assert_allclose(terms[i, :T].numpy(), want, rtol=1e-12, atol=1e-12)
        assert torch.all(terms[i, T:] == 0)
    sums = shaping_sum(values, lengths, kind, gamma, shaping, terminal)
    want_sums = [sum(loop_terms(r, kind, gamma, shaping, terminal)) for r in rows]
    np.testing.assert_allclose(sums.numpy(), want_sums, rtol=1e-12, atol=1e-12)
    assert shaping_sum_rows(rows, kind, gamma, shaping, terminal) == pytest.approx(
        want_sums, rel=1e-12, abs=1e-12
    )


@pytest.mark.parametrize("kind,gamma,shaping,terminal", CASES)
def test_pair_offset_matches_loop(kind, gamma, shaping, terminal):
    rng = np.random.default_rng(1)
    chosen, rejected = random_rows(rng, 5, kind), random_rows(rng, 5, kind)
    if kind == "state":  # one prompt per pair: one start state
        rejected = [[c[0]] + r[1:] for c, r in zip(chosen, rejected)]
    want = [
        sum(loop_terms(c, kind, gamma, shaping, terminal))
        - sum(loop_terms(r, kind, gamma, shaping, terminal))
        for c, r in zip(chosen, rejected)
    ]
    extra = 1 if kind == "state" else 0
    cv, cs = pad(chosen, fill=1e30)
    rv, rs = pad(rejected, fill=-1e30)
    got = pair_offset(cv, cs - extra, rv, rs - extra, kind, gamma, shaping, terminal)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    assert pair_offset_rows(chosen, rejected, kind, gamma, shaping, terminal) == pytest.approx(
        want, rel=1e-12, abs=1e-12
    )


def test_terminal_zero_unit_gamma_offset_is_exactly_zero():
    rng = np.random.default_rng(2)
    chosen, rejected = random_rows(rng, 50, "state"), random_rows(rng, 50, "state")
    offsets = pair_offset_rows(chosen, rejected, "state", 1.0, "pbrs", "zero")
    assert offsets == [0.0] * 50


def test_next_only_has_no_start_potential():
    values = torch.tensor([[100.0, 1.0, 2.0, 3.0]])
    lengths = torch.tensor([3])
    # γ·(Φ(s_1) + Φ(s_2) + Φ(s_3)); Φ(s_0) = 100 never enters
    assert shaping_sum(values, lengths, "state", 0.5, "next_only", "teacher").item() == 3.0
    assert shaping_sum(values, lengths, "state", 0.5, "next_only", "zero").item() == 1.5


def test_padding_invariance():
    rng = np.random.default_rng(3)
    rows = random_rows(rng, 4, "state")
    a, sizes = pad(rows, fill=0.0)
    b, _ = pad(rows, fill=float("inf"))
    c = torch.cat([a, torch.full((4, 5), -7.0, dtype=torch.float64)], 1)  # wider padding
    lengths = sizes - 1
    for gamma, shaping, terminal in [
        (1.0, "pbrs", "teacher"),
        (0.9, "pbrs", "zero"),
        (0.8, "next_only", "teacher"),
    ]:
        ref = shaping_sum(a, lengths, "state", gamma, shaping, terminal)
        assert torch.equal(ref, shaping_sum(b, lengths, "state", gamma, shaping, terminal))
        assert torch.equal(ref, shaping_sum(c, lengths, "state", gamma, shaping, terminal))
        ta = shaping_terms(a, lengths, "state", gamma, shaping, terminal)
        tc = shaping_terms(c, lengths, "state", gamma, shaping, terminal)
        assert torch.equal(ta, tc[:, : ta.shape[1]]) and torch.all(tc[:, ta.shape[1] :] == 0)


def test_rejects_bad_options():
    v, n = torch.zeros(2, 4), torch.tensor([3, 2])
    with pytest.raises(ValueError, match="action"):
        shaping_sum(v, n, "action", gamma=0.9)
    with pytest.raises(ValueError, match="shaping"):
        shaping_sum(v, n, "state", shaping="pbr")
    with pytest.raises(ValueError, match="terminal"):
        shaping_sum(v, n, "state", terminal="none")
    with pytest.raises(ValueError, match="lengths"):
        shaping_sum(v, torch.tensor([4, 2]), "state")  # a state row of T+1 = 4 columns has T ≤ 3
    with pytest.raises(ValueError, match="lengths"):
        shaping_sum(v, torch.tensor([0, 2]), "state")
