"""Margin accuracy of the trained student (docs/methods.md §A.6; the paper's Table 5 score).

S(x, y) = β·(log π_θ − log π_ref)(y|x), the student's implicit reward with the loss's own β
(`EvalSettings.implicit_reward_beta`); margin accuracy = mean over test pairs of
[S(x, y_w) > S(x, y_l)], ties per `eval.ties`. On data carrying oracle scores (the testbed) also
the oracle margin accuracy, against the oracle's true preference.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tvkd.cache.teacher import build_reference_cache
from tvkd.evaluation import EVALUATORS, EvalContext
from tvkd.evaluation.metrics import (
    implicit_rewards,
    oracle_margin_accuracy,
    oracle_scores,
    pairwise_accuracy,
    sequence_logps,
)


@EVALUATORS.register("margin_accuracy", switch="margin_accuracy", inputs=("test_pairs",), order=10,
                     description="student implicit-reward margin accuracy on the test pairs (+ oracle agreement)")
def margin_accuracy(ctx: EvalContext) -> dict[str, Any]:
    test = ctx.test
    ref_cache = build_reference_cache(test.dataset, test.fingerprint, ctx.reference, ctx.reference.key,
                                      pad_id=ctx.pad_id, progress=False)
    ref = (np.array([sum(x) for x in ref_cache.dataset["chosen/ref_logps"]], dtype=np.float64),
           np.array([sum(x) for x in ref_cache.dataset["rejected/ref_logps"]], dtype=np.float64))
    pol = sequence_logps(ctx.policy, test.dataset, pad_id=ctx.pad_id, batch_size=ctx.cfg.eval.batch_size)
    s_w, s_l = implicit_rewards(pol, ref, ctx.settings.implicit_reward_beta)
    out = {"margin_accuracy": pairwise_accuracy(s_w, s_l, ctx.cfg.eval.ties),
           "implicit_reward_margin": float(np.mean(s_w - s_l))}
    tie = 0.5 if ctx.cfg.eval.ties == "half" else 0.0
    ctx.items["pairs"] = [{"id": i, "margin_accuracy": 1.0 if a > b else tie if a == b else 0.0,
                           "s_chosen": float(a), "s_rejected": float(b)}
                          for i, a, b in zip(test.dataset["id"], s_w, s_l)]
    oracle = oracle_scores([json.loads(x) for x in test.dataset["meta"]])
    if oracle is not None:
        out["oracle_margin_accuracy"] = oracle_margin_accuracy(s_w, s_l, *oracle, ctx.cfg.eval.ties)
    return out
