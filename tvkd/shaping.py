"""Per-token reward shaping from teacher aux rewards, and the TVKD pair offset (docs/methods.md §A.2, §A.3).

For a response y = (a_0..a_{T-1}) with states s_0..s_T (s_T after EOS):

- state kind, potential Φ:  ψ_t = γ·Φ(s_{t+1}) − Φ(s_t)   (`shaping="pbrs"`, potential-based shaping)
                            ψ_t = γ·Φ(s_{t+1})            (`shaping="next_only"`)
  with Φ(s_T) the teacher's value after EOS (`terminal="teacher"`) or 0 (`terminal="zero"`);
- action kind, reward f:    ψ_t = f(s_t, a_t).

Ψ = Σ_t ψ_t is the response's shaping sum and Ψ_w − Ψ_l the pair offset that TVKD subtracts
from the DPO margin (paper Eq. 3). With pbrs and γ = 1 the sum telescopes to Φ(s_T) − Φ(s_0),
and the chosen and rejected responses share s_0 (same prompt), so the pair offset is
Φ(s_T^w) − Φ(s_T^l); with `terminal="zero"` as well it is exactly 0 and TVKD is DPO.

Tensor layout: `values` is [N, T+1] for a state kind (column t = Φ(s_t), t ≤ T_i) or [N, T] for
an action kind (column t = f(s_t, a_t), t < T_i), right-padded; `lengths` [N] holds T_i, the
number of response tokens (EOS included). Values beyond a row's length are never read into the
result, whatever they hold (even inf/nan).

`pair_offset_rows` computes the same offsets from Python lists (the cached columns
``chosen/<AuxSpec.column>`` and ``rejected/<AuxSpec.column>``) inside `datasets.map`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

KINDS = ("state", "action")
SHAPINGS = ("pbrs", "next_only")
TERMINALS = ("teacher", "zero")


def check_options(kind: str, gamma: float, shaping: str, terminal: str) -> None:
    """Validate the shaping options; an action kind takes none of them (it has no potential)."""
    if kind not in KINDS:
        raise ValueError(f"unknown aux kind {kind!r}; valid: {', '.join(KINDS)}")
    if shaping not in SHAPINGS:
        raise ValueError(f"unknown shaping {shaping!r}; valid: {', '.join(SHAPINGS)}")
    if terminal not in TERMINALS:
        raise ValueError(f"unknown terminal {terminal!r}; valid: {', '.join(TERMINALS)}")
    if kind == "action" and (gamma != 1.0 or shaping != "pbrs" or terminal != "teacher"):
        raise ValueError(
            "an action aux reward is used as ψ_t = f(s_t, a_t) directly: gamma, shaping and terminal "
            f"apply to state potentials only (got gamma={gamma}, shaping={shaping!r}, terminal={terminal!r})"
        )


def _positions(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=lengths.device).unsqueeze(0).expand(lengths.shape[0], width)


def _check(values: torch.Tensor, lengths: torch.Tensor, kind: str) -> None:
    if values.dim() != 2 or lengths.shape != values.shape[:1]:
        raise ValueError(
            f"expected values [N, W] and lengths [N], got {tuple(values.shape)} and {tuple(lengths.shape)}"
        )
    width = values.shape[1] - (1 if kind == "state" else 0)
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > width):
        raise ValueError(
            f"response lengths must lie in [1, {width}] for {kind} values of shape {tuple(values.shape)}; "
            f"got min {int(lengths.min())}, max {int(lengths.max())}"
        )


def _masked(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # where(), not multiplication, so that padding holding inf/nan cannot leak in
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _terminal(values: torch.Tensor, lengths: torch.Tensor, terminal: str) -> torch.Tensor:
    """[N] Φ(s_T) per the terminal option."""
    phi_end = values.gather(1, lengths.long().unsqueeze(1)).squeeze(1)
    return torch.zeros_like(phi_end) if terminal == "zero" else phi_end


def _interior_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[N] Σ_{t=1}^{T-1} Φ(s_t): the potentials of the states strictly inside the response."""
    pos = _positions(lengths, values.shape[1])
    keep = (pos >= 1) & (pos < lengths.unsqueeze(1))
    return _masked(values, keep).sum(1)


def shaping_terms(
    values: torch.Tensor,
    lengths: torch.Tensor,
    kind: str,
    gamma: float = 1.0,
    shaping: str = "pbrs",
    terminal: str = "teacher",
) -> torch.Tensor:
    """[N, T] per-token shaping ψ_t (0 beyond each row's length); docs/methods.md §A.2.

    For a state kind `values` is [N, T+1] (potentials of s_0..s_T); for an action kind [N, T].
    """
    check_options(kind, gamma, shaping, terminal)
    _check(values, lengths, kind)
    if kind == "action":
        return _masked(values, _positions(lengths, values.shape[1]) < lengths.unsqueeze(1))
    width = values.shape[1] - 1
    lengths = lengths.long()
    pos = _positions(lengths, width)
    nxt = values[:, 1:]
    if terminal == "zero":
        # Φ(s_T) := 0 at the row's own terminal column t + 1 = T_i
        nxt = _masked(nxt, pos + 1 != lengths.unsqueeze(1))
    psi = gamma * nxt
    if shaping == "pbrs":
        psi = psi - values[:, :-1]
    return _masked(psi, pos < lengths.unsqueeze(1))


def shaping_sum(
    values: torch.Tensor,
    lengths: torch.Tensor,
    kind: str,
    gamma: float = 1.0,
    shaping: str = "pbrs",
    terminal: str = "teacher",
) -> torch.Tensor:
    """[N] Ψ = Σ_t ψ_t over each response, in closed form.

    pbrs:      Σ_t ψ_t = γ·Φ(s_T) + (γ − 1)·Σ_{t=1}^{T-1} Φ(s_t) − Φ(s_0)
    next_only: Σ_t ψ_t = γ·(Φ(s_T) + Σ_{t=1}^{T-1} Φ(s_t))
    action:    Σ_t f(s_t, a_t)

    Why the closed form: summing the T rounded differences γΦ(s_{t+1}) − Φ(s_t) leaves the
    rounding error of every term, so the telescoping identity (γ = 1: Ψ = Φ(s_T) − Φ(s_0)) would
    hold only approximately. Regrouping the sum by state makes the interior coefficient γ − 1
    exactly 0 at γ = 1 (the interior is skipped), so the identity holds to the last bit.
    """
    check_options(kind, gamma, shaping, terminal)
    _check(values, lengths, kind)
    if kind == "action":
        return shaping_terms(values, lengths, kind).sum(1)
    lengths = lengths.long()
    phi_end = _terminal(values, lengths, terminal)
    if shaping == "next_only":
        return gamma * (phi_end + _interior_sum(values, lengths))
    total = gamma * phi_end - values[:, 0]
    if gamma != 1.0:
        total = total + (gamma - 1.0) * _interior_sum(values, lengths)
    return total


def pair_offset(
    chosen_values: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_values: torch.Tensor,
    rejected_lengths: torch.Tensor,
    kind: str,
    gamma: float = 1.0,
    shaping: str = "pbrs",
    terminal: str = "teacher",
) -> torch.Tensor:
    """[B] Ψ_w − Ψ_l, the shaping offset of each pair (paper Eq. 3; docs/methods.md §A.3).

    For pbrs the shared start potential cancels analytically,

        Ψ_w − Ψ_l = γ·(Φ(s_T^w) − Φ(s_T^l)) + (γ − 1)·(Σ_mid Φ^w − Σ_mid Φ^l),

    so Φ(s_0) is never read: the teacher computes it once per row, and two separately rounded
    copies (different padding or batch composition) need not agree to the last bit. Hence, at
    γ = 1 with `terminal="zero"`, the offset is exactly 0.0 and TVKD reproduces DPO bit for bit.
    """
    check_options(kind, gamma, shaping, terminal)
    if chosen_values.shape[0] != rejected_values.shape[0]:
        raise ValueError("chosen and rejected must hold the same number of pairs")
    if kind == "action" or shaping == "next_only":
        # no start potential is involved: a plain difference of the two sums
        return shaping_sum(chosen_values, chosen_lengths, kind, gamma, shaping, terminal) - shaping_sum(
            rejected_values, rejected_lengths, kind, gamma, shaping, terminal
        )
    _check(chosen_values, chosen_lengths, kind)
    _check(rejected_values, rejected_lengths, kind)
    cl, rl = chosen_lengths.long(), rejected_lengths.long()
    offset = gamma * (_terminal(chosen_values, cl, terminal) - _terminal(rejected_values, rl, terminal))
    if gamma != 1.0:
        offset = offset + (gamma - 1.0) * (
            _interior_sum(chosen_values, cl) - _interior_sum(rejected_values, rl)
        )
    return offset


# --------------------------------------------------------------------------------------------
# Python-list versions, for `datasets.map` over the cached columns.


def pad_rows(rows: Sequence[Sequence[float]], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-response lists into ([N, W] float64, lengths [N]).

    A state row holds T+1 potentials and an action row T values, so the length is the row's
    size minus one for a state kind.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown aux kind {kind!r}; valid: {', '.join(KINDS)}")
    sizes = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(sizes.max()) if len(rows) else 1
    out = np.zeros((len(rows), width), dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    lengths = sizes - (1 if kind == "state" else 0)
    return torch.from_numpy(out), torch.from_numpy(lengths)


def pair_offset_rows(
    chosen: Sequence[Sequence[float]],
    rejected: Sequence[Sequence[float]],
    kind: str,
    gamma: float = 1.0,
    shaping: str = "pbrs",
    terminal: str = "teacher",
) -> list[float]:
    """Ψ_w − Ψ_l per pair, from lists of cached values (float64), as `pair_offset`."""
    if len(chosen) != len(rejected):
        raise ValueError("chosen and rejected must hold the same number of pairs")
    if not len(chosen):
        return []
    cv, cl = pad_rows(chosen, kind)
    rv, rl = pad_rows(rejected, kind)
    return pair_offset(cv, cl, rv, rl, kind, gamma, shaping, terminal).tolist()


def shaping_sum_rows(
    rows: Sequence[Sequence[float]],
    kind: str,
    gamma: float = 1.0,
    shaping: str = "pbrs",
    terminal: str = "teacher",
) -> list[float]:
    """Ψ per response, from lists of cached values (float64), as `shaping_sum`."""
    if not len(rows):
        return []
    values, lengths = pad_rows(rows, kind)
    return shaping_sum(values, lengths, kind, gamma, shaping, terminal).tolist()
