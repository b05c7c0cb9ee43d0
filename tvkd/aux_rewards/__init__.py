"""Auxiliary rewards from the teacher's raw logits (the paper's Table 5; docs/methods.md §A.2).

Each aux reward is read off the teacher's logits z at one state s (π = softmax(z)) and lives in
its own module of this package, registered into `AUX_REWARDS` with its kind, its formula and a
float64 reference computation the tests compare it against. The six of the paper:

| name          | kind   | value                                  |
|---------------|--------|----------------------------------------|
| `logits`      | action | Q(s, a) = z(a)                         |
| `log_prob`    | action | log π(a)                               |
| `max`         | state  | max_a π(a)                             |
| `margin`      | state  | π_(1) − π_(2) (top-1 minus top-2 prob) |
| `expectation` | state  | Σ_a π(a)·Q(s, a)                       |
| `soft_value`  | state  | β_V·log Σ_a exp(Q(s, a)/β_V) (Lemma 1) |

An *action* reward f(s_t, a_t) is one value per response token; a *state* reward Φ(s) is one
potential per state s_0..s_T and is turned into per-token shaping by `tvkd.shaping`.

Adding one is one file here (or in any package registered through the ``tvkd.aux_rewards``
entry-point group)::

    @AUX_REWARDS.register("entropy", kind="state", formula=r"-\\sum_a \\pi(a)\\log\\pi(a)",
                          uses_temperature=False, uses_q=False, reference=entropy_reference)
    def entropy(stats, actions=None, *, temperature=None, q_source="logits"):
        return stats.lse - stats.expected_logit

The function receives a `LogitStats` (shared reductions of one chunk of logits, computed at most
once whatever else is requested) and returns one fp32 value per state. The teacher cache stores
one column per aux reward and computes a column the first time a loss asks for it, so a new aux
reward invalidates no existing cache.

Q source. By Lemma 1 of the paper the teacher's raw logits are its soft Q-function, so Q = z by
default (`q_source="logits"`). `q_source="logprobs"` takes Q = log π = z − logsumexp(z) instead
(all that a top-k probability cache could provide). That is a per-state shift of Q by
−logsumexp(z), so it moves exactly the Q-dependent rewards (`uses_q=True`) and leaves the
π-only ones alone. We compute it as that shift, which makes soft_value at β_V = 1 *identically*
0 (logsumexp(z) − logsumexp(z) of the same rounded number) and negative/positive for β_V
below/above 1.

All math is fp32 whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

from tvkd.api import AUX_REWARDS, Q_SOURCES, AuxSpec

__all__ = [
    "AUX_REWARDS", "Q_SOURCES", "TABLE5", "LogitStats", "aux_kind", "aux_reward", "compute_aux", "make_spec",
    "need_actions", "q_shift", "reference_stats", "reference_value",
]

#: The six aux rewards of the paper's Table 5, in its order.
TABLE5 = ("logits", "log_prob", "max", "margin", "expectation", "soft_value")

# Rows of logits processed at once by `compute_aux` when no chunk size is given: bounds each
# fp32 [rows, V] temporary to 2**26 elements (256 MiB), whatever N is.
_CHUNK_ELEMENTS = 1 << 26


class LogitStats:
    """Reductions of one logits tensor z [..., V], each computed at most once and shared.

    The aux rewards of one state only need a handful of [...]-shaped reductions of z
    (logsumexp, top-2, Σπz, tempered logsumexp); holding them here lets `compute_aux` serve
    every requested spec while creating at most two [..., V] fp32 temporaries at a time.
    """

    def __init__(self, z: torch.Tensor):
        if z.dim() < 1 or z.shape[-1] < 1:
            raise ValueError(f"logits must have a vocabulary dimension, got shape {tuple(z.shape)}")
        self.z = z.float()  # no copy when z is already fp32
        self._tempered: dict[float, torch.Tensor] = {}

    @cached_property
    def max(self) -> torch.Tensor:
        return self.z.amax(dim=-1)

    @cached_property
    def _exp_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_a e(a), Σ_a e(a)·z(a)) with e = exp(z − max z): one exp pass serves logsumexp and Σπz.

        Elementwise products and sums rather than a matmul: a GPU matmul may run in TF32.
        """
        e = (self.z - self.max.unsqueeze(-1)).exp_()
        total = e.sum(-1)
        weighted = e.mul_(self.z).sum(-1)  # reuses e's memory: one [..., V] temporary in all
        return total, weighted

    @cached_property
    def lse(self) -> torch.Tensor:
        """logsumexp_a z(a) = log Z, the log-partition of π."""
        return self.max + self._exp_sums[0].log()

    @cached_property
    def top2(self) -> torch.Tensor:
        """[..., 2] the two largest logits, largest first."""
        if self.z.shape[-1] < 2:
            raise ValueError("the margin aux reward needs a vocabulary of at least 2 tokens")
        return self.z.topk(2, dim=-1).values

    @cached_property
    def expected_logit(self) -> torch.Tensor:
        """Σ_a π(a)·z(a) = Σ_a e(a)z(a) / Σ_a e(a)."""
        total, weighted = self._exp_sums
        return weighted / total

    def tempered_lse(self, temperature: float) -> torch.Tensor:
        """logsumexp_a z(a)/β_V, cached per temperature (β_V = 1 reuses `lse` bit for bit)."""
        t = float(temperature)
        if t == 1.0:
            return self.lse
        if t not in self._tempered:
            m = self.max
            self._tempered[t] = m / t + (self.z - m.unsqueeze(-1)).div_(t).exp_().sum(-1).log()
        return self._tempered[t]

    def gather(self, actions: torch.Tensor) -> torch.Tensor:
        """z(a) for the taken token ids `actions` [...]."""
        if actions.shape != self.z.shape[:-1]:
            raise ValueError(
                f"action ids of shape {tuple(actions.shape)} do not match logits {tuple(self.z.shape)}"
            )
        return self.z.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def _stats(z: torch.Tensor | LogitStats) -> LogitStats:
    return z if isinstance(z, LogitStats) else LogitStats(z)


def q_shift(stats: LogitStats, q_source: str) -> torch.Tensor | None:
    """The per-state shift that turns Q = z into the requested Q source (None for logits)."""
    if q_source not in Q_SOURCES:
        raise ValueError(f"unknown q_source {q_source!r}; valid: {', '.join(Q_SOURCES)}")
    return stats.lse if q_source == "logprobs" else None


def need_actions(name: str, actions: torch.Tensor | None) -> torch.Tensor:
    if actions is None:
        raise ValueError(f"aux reward {name!r} is an action reward and needs the taken token ids")
    return actions


def aux_kind(name: str) -> str:
    """The kind of an aux reward, "action" or "state"; an unknown name gets a "did you mean"."""
    return AUX_REWARDS.meta(name)["kind"]


def make_spec(name: str, *, q_source: str = "logits", temperature: float | None = None) -> AuxSpec:
    """The canonical `AuxSpec` of an aux reward (`AuxSpec` canonicalises itself)."""
    return AuxSpec(name, q_source=q_source, temperature=temperature)


def aux_reward(
    spec: AuxSpec, z: torch.Tensor | LogitStats, actions: torch.Tensor | None = None
) -> torch.Tensor:
    """One aux reward for a spec, from logits [..., V] (and the taken ids [...] for action kinds)."""
    fn = AUX_REWARDS.get(spec.name)
    return fn(_stats(z), actions, temperature=spec.temperature, q_source=spec.q_source)


def compute_aux(
    logits: torch.Tensor,
    next_ids: torch.Tensor | None,
    specs: Sequence[AuxSpec],
    *,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Every requested aux reward from one logits tensor: {spec.column: [N] fp32}.

    `logits` [N, V] are the teacher's logits at N states (any dtype; math in fp32); `next_ids`
    [N] the token taken at each state (needed only by action kinds; at a state with no next
    token, e.g. s_T, pass any valid id and ignore the value). Rows are processed `chunk_size`
    at a time (default: as many as keep one [rows, V] fp32 tensor under 2**26 elements) and,
    within a chunk, the reductions are shared across specs, so at most about two [rows, V]
    temporaries exist at once. A value does not depend on which other specs are computed with it.
    """
    if logits.dim() != 2:
        raise ValueError(f"compute_aux expects logits [N, V], got shape {tuple(logits.shape)}")
    specs = list(dict.fromkeys(specs))  # duplicates would be computed twice for one column
    for spec in specs:
        if spec.kind == "action" and next_ids is None:
            raise ValueError(f"aux reward {spec.name!r} is an action reward and needs next_ids")
    n, v = logits.shape
    if next_ids is not None and next_ids.shape != (n,):
        raise ValueError(f"next_ids must have shape ({n},), got {tuple(next_ids.shape)}")
    rows = chunk_size or max(1, _CHUNK_ELEMENTS // max(v, 1))
    out = {spec.column: torch.empty(n, dtype=torch.float32, device=logits.device) for spec in specs}
    for start in range(0, n, rows):
        stats = LogitStats(logits[start : start + rows])
        ids = None if next_ids is None else next_ids[start : start + rows]
        for spec in specs:
            out[spec.column][start : start + rows] = aux_reward(spec, stats, ids)
        del stats  # free this chunk's temporaries before the next
    return out


# --------------------------------------------------------------------------------------------
# float64 references: one state at a time, written out plainly, for the tests.


def reference_stats(z: Sequence[float], q_source: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(Q, π, log Z) of one state in float64 from its logits z, with Q per the Q source."""
    z = np.asarray(z, dtype=np.float64)
    m = float(z.max())
    log_z = m + math.log(float(np.exp(z - m).sum()))
    pi = np.exp(z - log_z)
    q = z if q_source == "logits" else z - log_z
    return q, pi, log_z


def reference_value(spec: AuxSpec, z: Sequence[float], action: int | None) -> float:
    """The registered float64 reference of an aux reward at one state."""
    ref = AUX_REWARDS.meta(spec.name)["reference"]
    return float(ref(np.asarray(z, dtype=np.float64), action, temperature=spec.temperature,
                     q_source=spec.q_source))
