"""The teacher's own margin accuracy on the test pairs (the paper's Table 3; docs/methods.md §A.6).

Does the teacher rank the test pairs right by its sequence log-prob Σ log π_T, its length-
normalised log-prob, or the shaping sum Ψ of the signal the loss trains with
(`EvalSettings.shaping`; the paper's soft_value at β_V = 2, pbrs, γ = 1 when the loss has none)?
The test-set teacher columns go through the same teacher cache as training.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tvkd.api import AuxSpec, ShapingSignal
from tvkd.cache.teacher import aux_specs, build_teacher_cache
from tvkd.evaluation import EVALUATORS, EvalContext
from tvkd.evaluation.metrics import oracle_margin_accuracy, oracle_scores, teacher_scores
from tvkd.shaping import shaping_sum_rows

DEFAULT_SIGNAL = ShapingSignal(AuxSpec("soft_value", temperature=2.0))


@EVALUATORS.register("teacher_scores", switch="teacher_scores", inputs=("test_pairs", "teacher", "teacher_signal"),
                     order=30, description="Table 3: the teacher's margin accuracy by Σ log π_T, mean log π_T, Ψ")
def teacher_score_metrics(ctx: EvalContext) -> dict[str, Any]:
    test, cfg = ctx.test, ctx.cfg
    signal = ctx.settings.shaping or DEFAULT_SIGNAL
    lp_spec = AuxSpec("log_prob")
    also = aux_specs(cfg.cache.precompute, cfg.cache.value_temperatures, cfg.cache.q_sources)
    tc = build_teacher_cache(test.dataset, test.fingerprint, ctx.teacher, ctx.teacher.key, [signal.spec, lp_spec],
                             also=also, vocab_size=ctx.teacher_vocab, pad_id=ctx.pad_id,
                             batch_size=cfg.cache.batch_size, progress=False)
    ctx.teacher.release()
    ds, opts = tc.dataset, signal.options()
    lw = np.array([sum(x) for x in ds["chosen/log_prob"]])
    ll = np.array([sum(x) for x in ds["rejected/log_prob"]])
    nw = np.array([len(x) for x in test.dataset["chosen_ids"]], dtype=float)
    nl = np.array([len(x) for x in test.dataset["rejected_ids"]], dtype=float)
    pw = np.array(shaping_sum_rows(ds[f"chosen/{signal.spec.column}"], **opts))
    pl = np.array(shaping_sum_rows(ds[f"rejected/{signal.spec.column}"], **opts))
    out = {f"teacher_scores/{k}": v for k, v in teacher_scores((lw, ll), (nw, nl), (pw, pl)).items()}
    oracle = oracle_scores([json.loads(x) for x in test.dataset["meta"]])
    if oracle is not None:
        for name, (a, b) in {"sum_logprob": (lw, ll), "mean_logprob": (lw / nw, ll / nl), "shaping": (pw, pl)}.items():
            out[f"teacher_scores/oracle_{name}"] = oracle_margin_accuracy(a, b, *oracle)
    return out
