"""Auxiliary rewards from the teacher's raw logits (the paper's Table 5; METHODS A.2).

Each aux reward is read off the teacher's logits z at one state s (π = softmax(z)):

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

Q source. By Lemma 1 of the paper the teacher's raw logits are its soft Q-function, so Q = z by
default (`q_source="logits"`). `q_source="logprobs"` takes Q = log π = z − logsumexp(z) instead
(all that a top-k probability cache could provide). That is a per-state shift of Q by
−logsumexp(z), so it moves exactly the Q-dependent rewards (`logits`, `expectation`,
`soft_value`) by −logsumexp(z) and leaves the π-only ones (`log_prob`, `max`, `margin`) alone.
We compute it as that shift, which makes soft_value at β_V = 1 *identically* 0 (it is
logsumexp(z) − logsumexp(z) of the same rounded number) and negative/positive for β_V below/above 1.

All math is fp32 whatever the input dtype. `compute_aux` computes many specs from one logits
tensor and shares the reductions between them (`LogitStats`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cached_property

import torch

from tvkd.losses.base import AuxSpec
from tvkd.registry import Registry

AuxFn = Callable[..., torch.Tensor]
AUX_REWARDS: Registry[AuxFn] = Registry("aux reward")

Q_SOURCES = ("logits", "logprobs")

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


def _check_q_source(q_source: str) -> None:
    if q_source not in Q_SOURCES:
        raise ValueError(f"unknown q_source {q_source!r}; valid: {', '.join(Q_SOURCES)}")


def _q_shift(stats: LogitStats, q_source: str) -> torch.Tensor | None:
    """The per-state shift that turns Q = z into the requested Q source (None for logits)."""
    _check_q_source(q_source)
    return stats.lse if q_source == "logprobs" else None


def _need_actions(name: str, actions: torch.Tensor | None) -> torch.Tensor:
    if actions is None:
        raise ValueError(f"aux reward {name!r} is an action reward and needs the taken token ids")
    return actions


# --------------------------------------------------------------------------------------------
# Action rewards: one value per (s_t, a_t).


@AUX_REWARDS.register("logits", kind="action", formula=r"Q(s,a) = z(a)", uses_temperature=False, uses_q=True)
def logits(z, actions=None, *, temperature=None, q_source="logits"):
    """Q(s_t, a_t): the teacher's raw logit of the taken token (Lemma 1: logits are soft Q-values)."""
    s = _stats(z)
    q = s.gather(_need_actions("logits", actions))
    shift = _q_shift(s, q_source)
    return q if shift is None else q - shift


@AUX_REWARDS.register("log_prob", kind="action", formula=r"\log \pi(a)", uses_temperature=False, uses_q=False)
def log_prob(z, actions=None, *, temperature=None, q_source="logits"):
    """log π(a_t|s_t) = z(a_t) − logsumexp(z); independent of the Q source."""
    _check_q_source(q_source)
    s = _stats(z)
    return s.gather(_need_actions("log_prob", actions)) - s.lse


# --------------------------------------------------------------------------------------------
# State rewards: one potential Φ(s) per state.


@AUX_REWARDS.register("max", kind="state", formula=r"\max_a \pi(a)", uses_temperature=False, uses_q=False)
def max_prob(z, actions=None, *, temperature=None, q_source="logits"):
    """max_a π(a|s): the teacher's confidence at s."""
    _check_q_source(q_source)
    s = _stats(z)
    return (s.top2[..., 0] - s.lse).exp() if s.z.shape[-1] >= 2 else (s.z.max(-1).values - s.lse).exp()


@AUX_REWARDS.register(
    "margin", kind="state", formula=r"\pi_{(1)} - \pi_{(2)}", uses_temperature=False, uses_q=False
)
def margin(z, actions=None, *, temperature=None, q_source="logits"):
    """π_(1) − π_(2): the top-1 minus the top-2 probability at s (a probability, not a log margin)."""
    _check_q_source(q_source)
    s = _stats(z)
    p = (s.top2 - s.lse.unsqueeze(-1)).exp()
    return p[..., 0] - p[..., 1]


@AUX_REWARDS.register(
    "expectation", kind="state", formula=r"\sum_a \pi(a)\, Q(s,a)", uses_temperature=False, uses_q=True
)
def expectation(z, actions=None, *, temperature=None, q_source="logits"):
    """Σ_a π(a|s)·Q(s, a); with Q = log π it is −H(π)."""
    s = _stats(z)
    shift = _q_shift(s, q_source)
    return s.expected_logit if shift is None else s.expected_logit - shift


@AUX_REWARDS.register(
    "soft_value",
    kind="state",
    formula=r"\beta_V \log \sum_a \exp\!\big(Q(s,a)/\beta_V\big)",
    uses_temperature=True,
    uses_q=True,
)
def soft_value(z, actions=None, *, temperature=None, q_source="logits"):
    """V(s) = β_V·logsumexp(Q(s,·)/β_V), the soft value of the teacher (Lemma 1).

    With Q = log π: β_V·logsumexp(z/β_V) − logsumexp(z) = β_V·log Σ_a π(a)^{1/β_V}, which is 0
    at β_V = 1, > 0 for β_V > 1 and < 0 for β_V < 1.
    """
    if temperature is None:
        raise ValueError("aux reward 'soft_value' needs a value temperature β_V")
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"the value temperature β_V must be a positive number, got {temperature!r}")
    s = _stats(z)
    v = t * s.tempered_lse(t)
    shift = _q_shift(s, q_source)
    return v if shift is None else v - shift


# --------------------------------------------------------------------------------------------


def aux_kind(name: str) -> str:
    """The kind of an aux reward, "action" or "state"; an unknown name gets a "did you mean"."""
    return AUX_REWARDS.meta(name)["kind"]


def make_spec(name: str, *, q_source: str = "logits", temperature: float | None = None) -> AuxSpec:
    """The canonical `AuxSpec` of an aux reward.

    The temperature is kept only for aux rewards that use it, and the Q source only for those
    whose value depends on it, so one cached column serves every config that yields the same
    numbers (e.g. `max` under either Q source is the column ``max``).
    """
    meta = AUX_REWARDS.meta(name)
    _check_q_source(q_source)
    if meta["uses_temperature"]:
        if temperature is None:
            raise ValueError(f"aux reward {name!r} needs a value temperature")
        temperature = float(temperature)
    else:
        temperature = None
    if not meta["uses_q"]:
        q_source = "logits"
    return AuxSpec(name=name, q_source=q_source, temperature=temperature)


def aux_reward(
    spec: AuxSpec, z: torch.Tensor | LogitStats, actions: torch.Tensor | None = None
) -> torch.Tensor:
    """One aux reward for a spec, from logits [..., V] (and the taken ids [...] for action kinds)."""
    fn = AUX_REWARDS.get(spec.name)
    return fn(z, actions, temperature=spec.temperature, q_source=spec.q_source)


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
    within a chunk, the logsumexp/top-2/expectation/tempered-logsumexp reductions are shared
    across specs, so at most about two [rows, V] temporaries exist at once.
    """
    if logits.dim() != 2:
        raise ValueError(f"compute_aux expects logits [N, V], got shape {tuple(logits.shape)}")
    specs = list(dict.fromkeys(specs))  # duplicates would be computed twice for one column
    for spec in specs:
        if aux_kind(spec.name) == "action" and next_ids is None:
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
