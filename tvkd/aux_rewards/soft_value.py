"""`soft_value` (state): V(s) = β_V·log Σ_a exp(Q(s, a)/β_V), the teacher's soft value (Lemma 1).

TVKD's potential (docs/methods.md §A.2, §A.3). β_V is the value temperature (the paper's best
is 2.0). With Q = log π (`q_source="logprobs"`) it equals β_V·log Σ_a π(a)^{1/β_V}, which is 0
at β_V = 1, > 0 for β_V > 1 and < 0 for β_V < 1.
"""

from __future__ import annotations

import math

import numpy as np

from tvkd.aux_rewards import AUX_REWARDS, q_shift, reference_stats


def reference(z, action=None, *, temperature=None, q_source="logits"):
    q, _, _ = reference_stats(z, q_source)
    scaled = q / temperature
    m = float(scaled.max())
    return temperature * (m + math.log(float(np.exp(scaled - m).sum())))


@AUX_REWARDS.register(
    "soft_value",
    kind="state",
    formula=r"\beta_V \log \sum_a \exp\!\big(Q(s,a)/\beta_V\big)",
    uses_temperature=True,
    uses_q=True,
    reference=reference,
)
def soft_value(stats, actions=None, *, temperature=None, q_source="logits"):
    """V(s) = β_V·logsumexp(Q(s,·)/β_V), the soft value of the teacher (Lemma 1)."""
    if temperature is None:
        raise ValueError("aux reward 'soft_value' needs a value temperature β_V")
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"the value temperature β_V must be a positive number, got {temperature!r}")
    v = t * stats.tempered_lse(t)
    shift = q_shift(stats, q_source)
    return v if shift is None else v - shift
