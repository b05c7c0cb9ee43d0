"""`logits` (action): Q(s_t, a_t) = z(a_t), the teacher's raw logit of the taken token.

Lemma 1 of the paper reads the teacher's logits as its soft Q-values, so this is the teacher's
Q of the action the response took (docs/methods.md §A.2). With `q_source="logprobs"` it is
log π(a_t), i.e. `log_prob`.
"""

from __future__ import annotations

from tvkd.aux_rewards import AUX_REWARDS, need_actions, q_shift, reference_stats


def reference(z, action, *, temperature=None, q_source="logits"):
    q, _, _ = reference_stats(z, q_source)
    return q[action]


@AUX_REWARDS.register("logits", kind="action", formula=r"Q(s,a) = z(a)", uses_temperature=False, uses_q=True,
                      reference=reference)
def logits(stats, actions=None, *, temperature=None, q_source="logits"):
    """Q(s_t, a_t): the teacher's raw logit of the taken token (Lemma 1: logits are soft Q-values)."""
    q = stats.gather(need_actions("logits", actions))
    shift = q_shift(stats, q_source)
    return q if shift is None else q - shift
