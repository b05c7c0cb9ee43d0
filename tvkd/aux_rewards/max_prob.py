"""`max` (state): Φ(s) = max_a π_T(a|s), the teacher's confidence at s (docs/methods.md §A.2)."""

from __future__ import annotations

from tvkd.aux_rewards import AUX_REWARDS, q_shift, reference_stats


def reference(z, action=None, *, temperature=None, q_source="logits"):
    _, pi, _ = reference_stats(z, q_source)
    return max(pi)


@AUX_REWARDS.register("max", kind="state", formula=r"\max_a \pi(a)", uses_temperature=False, uses_q=False,
                      reference=reference)
def max_prob(stats, actions=None, *, temperature=None, q_source="logits"):
    """max_a π(a|s): the teacher's confidence at s."""
    q_shift(stats, q_source)  # validates the name
    top = stats.top2[..., 0] if stats.z.shape[-1] >= 2 else stats.max
    return (top - stats.lse).exp()
