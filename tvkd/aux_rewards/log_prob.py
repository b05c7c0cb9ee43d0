"""`log_prob` (action): log π_T(a_t|s_t), the teacher's log-probability of the taken token.

docs/methods.md §A.2. Independent of the Q source (π does not change when Q shifts per state).
"""

from __future__ import annotations

from tvkd.aux_rewards import AUX_REWARDS, need_actions, q_shift, reference_stats


def reference(z, action, *, temperature=None, q_source="logits"):
    _, _, log_z = reference_stats(z, q_source)
    return z[action] - log_z


@AUX_REWARDS.register("log_prob", kind="action", formula=r"\log \pi(a)", uses_temperature=False, uses_q=False,
                      reference=reference)
def log_prob(stats, actions=None, *, temperature=None, q_source="logits"):
    """log π(a_t|s_t) = z(a_t) − logsumexp(z); independent of the Q source."""
    q_shift(stats, q_source)  # validates the name
    return stats.gather(need_actions("log_prob", actions)) - stats.lse
