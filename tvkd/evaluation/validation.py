"""A run on its validation split (``data.validation_fraction``, `tvkd.data.holdout`): what a study's ``select``
picks a method's learning rate (or checkpoint) by, the test numbers of the pick being reported.

Greedy generations on the unique validation prompts (as the test's `generation` evaluator makes them), then

- ``val/oracle_score``: their mean oracle score r* (testbed runs);
- ``val/rm_score``: their mean reward-model score, scored by the ``rm`` benchmark's reward models
  (`tvkd.benchmarks.rm_score.load_reward_model`: the oracle on the testbed by default, or
  ``eval.validation_reward_model``: a 1-output sequence-classification reward model fed its own chat template);
- ``val/prompts``: how many prompts.

Per prompt (prompt, response, oracle, rm) rows go to the run folder's ``validation.jsonl``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ORACLE = "oracle"


def validation_reward_model(cfg: Any, testbed: bool) -> str | None:
    """What scores val/rm_score: ``eval.validation_reward_model``, else the oracle on a testbed run, else None."""
    return cfg.eval.validation_reward_model or (ORACLE if testbed else None)


def evaluate_validation(policy: Any, tokenizer: Any, examples: list, cfg: Any, *, testbed: bool,
                        progress: bool = True, say: Any = print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the val/ metrics, one row per validation prompt) of a trained policy on the validation pairs."""
    from tvkd.benchmarks.rm_score import load_reward_model
    from tvkd.evaluation.generation import unique_prompts
    from tvkd.generation import generate

    prompts = unique_prompts(examples)
    texts = generate(policy, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                     batch_size=cfg.eval.batch_size, progress=progress)
    rows: list[dict[str, Any]] = [{"prompt": p[-1]["content"], "response": r[0]} for p, r in zip(prompts, texts)]
    metrics: dict[str, Any] = {"val/prompts": len(rows)}
    if testbed:
        from tvkd.testbed import score

        for row in rows:
            row["oracle"] = float(score(row["prompt"], row["response"]))
        metrics["val/oracle_score"] = float(np.mean([row["oracle"] for row in rows]))
    name = validation_reward_model(cfg, testbed)
    if name is not None:
        rm = load_reward_model(name, testbed=testbed)
        say(f"  validation: scoring {len(rows)} answers with {rm.name}")
        scores = rm.score(prompts, [row["response"] for row in rows], progress=progress)
        for row, s in zip(rows, scores, strict=True):
            row["rm"] = float(s)
        metrics["val/rm_score"] = float(np.mean(scores))
        metrics["val/reward_model"] = name
    return metrics, rows
