"""`expectation` (state): Φ(s) = Σ_a π_T(a|s)·Q(s, a), the teacher's expected Q at s.

With Q = log π (`q_source="logprobs"`) it is −H(π_T(·|s)), minus the teacher's entropy
(docs/methods.md §A.2).
"""

from __future__ import annotations

from tvkd.aux_rewards import AUX_REWARDS, q_shift, reference_stats


def reference(z, action=None, *, temperature=None, q_source="logits"):
    q, pi, _ = reference_stats(z, q_source)
    return float((pi * q).sum())


@AUX_REWARDS.register("expectation", kind="state", formula=r"\sum_a \pi(a)\, Q(s,a)", uses_temperature=False,
                      uses_q=True, reference=reference)
def expectation(stats, actions=None, *, temperature=None, q_source="logits"):
    """Σ_a π(a|s)·Q(s, a); with Q = log π it is −H(π)."""
    shift = q_shift(stats, q_source)
    return stats.expected_logit if shift is None else stats.expected_logit - shift
