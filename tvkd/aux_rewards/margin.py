"""`margin` (state): Φ(s) = π_(1) − π_(2), the top-1 minus the top-2 teacher probability at s.

A difference of probabilities, not of log-probabilities (docs/methods.md §A.2).
"""

from __future__ import annotations

from tvkd.aux_rewards import AUX_REWARDS, q_shift, reference_stats


def reference(z, action=None, *, temperature=None, q_source="logits"):
    _, pi, _ = reference_stats(z, q_source)
    p = sorted(pi, reverse=True)
    return p[0] - p[1]


@AUX_REWARDS.register("margin", kind="state", formula=r"\pi_{(1)} - \pi_{(2)}", uses_temperature=False,
                      uses_q=False, reference=reference)
def margin(stats, actions=None, *, temperature=None, q_source="logits"):
    """π_(1) − π_(2): the top-1 minus the top-2 probability at s (a probability, not a log margin)."""
    q_shift(stats, q_source)  # validates the name
    p = (stats.top2 - stats.lse.unsqueeze(-1)).exp()
    return p[..., 0] - p[..., 1]
