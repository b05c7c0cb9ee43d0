"""Greedy generations on the test prompts, and what the testbed's oracle says of them.

The outputs (prompt, response, oracle score on the testbed) go to the run's outputs.jsonl; study
tables compute win rates between runs from them. On the testbed: oracle score r*, exact match
and the flaw rate (answers that repeat their last element before end-of-turn).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tvkd.data.holdout import prompt_key
from tvkd.evaluation import EVALUATORS, EvalContext


def unique_prompts(examples: list) -> list[list[dict[str, Any]]]:
    seen, prompts = set(), []
    for ex in examples:
        key = prompt_key(ex.prompt)
        if key not in seen:
            seen.add(key)
            prompts.append(ex.prompt)
    return prompts


@EVALUATORS.register("generation", switch="generate", inputs=("test_pairs",), order=20,
                     description="greedy generations on the test prompts; oracle score on the testbed")
def generation(ctx: EvalContext) -> dict[str, Any]:
    from tvkd.generation import generate

    prompts = unique_prompts(ctx.test_examples)
    texts = generate(ctx.policy, ctx.tokenizer, prompts, max_new_tokens=ctx.cfg.eval.max_new_tokens,
                     batch_size=ctx.cfg.eval.batch_size, progress=ctx.progress)
    outputs = [{"prompt": p[-1]["content"], "response": r[0]} for p, r in zip(prompts, texts)]
    metrics: dict[str, Any] = {}
    if ctx.testbed:
        from tvkd.testbed import exact_match, has_flaw, score

        for o in outputs:
            o["oracle"] = score(o["prompt"], o["response"])
        metrics["oracle_score"] = float(np.mean([o["oracle"] for o in outputs]))
        metrics["exact_match"] = float(np.mean([exact_match(o["prompt"], o["response"]) for o in outputs]))
        metrics["flaw_rate"] = float(np.mean([has_flaw(o["prompt"], o["response"]) for o in outputs]))
    metrics["response_words"] = float(np.mean([len(o["response"].split()) for o in outputs]))
    metrics["eval_prompts"] = len(outputs)
    ctx.outputs = outputs
    return metrics
