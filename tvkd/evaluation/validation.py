"""A run on its validation split (``data.validation_fraction``, `tvkd.data.holdout`): what a study's ``select``
picks a method's learning rate (or checkpoint) by, the test numbers of the pick being reported.

Greedy generations on the unique validation prompts (as the test's `generation` evaluator makes them), then

- ``val/oracle_score``: their mean oracle score r* (testbed runs);
- ``val/rm_score``: their mean reward-model score, scored by the ``rm`` benchmark's reward models
  (`tvkd.benchmarks.rm_score.load_reward_model`: the oracle on the testbed by default, or
  ``eval.validation_reward_model``: a 1-output sequence-classification reward model fed its own chat template);
- ``val/prompts``: how many prompts.

Per prompt (prompt, response, oracle, rm) rows go to the run folder's ``validation.jsonl``.

Checkpoint selection (``eval.checkpoints``: fractions of the training steps): `checkpoint_selector` is a
`transformers.TrainerCallback` that evaluates the policy on the validation split at those steps (the policy in
eval mode, greedy decoding: no random number is drawn, so training goes on exactly as without it), keeps a copy
of the weights with the best ``val/<eval.checkpoint_metric>`` (a tie keeps the earlier step) and loads them
back when training ends: the run is then tested (and evaluated on validation again) with the picked weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ORACLE = "oracle"


def validation_reward_model(cfg: Any, testbed: bool) -> str | None:
    """What scores val/rm_score: ``eval.validation_reward_model``, else the oracle on a testbed run, else None."""
    return cfg.eval.validation_reward_model or (ORACLE if testbed else None)


def evaluate_validation(policy: Any, tokenizer: Any, examples: list, cfg: Any, *, testbed: bool,
                        progress: bool = True, say: Any = print, reward_model: Any = None
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the val/ metrics, one row per validation prompt) of a trained policy on the validation pairs.
    ``reward_model``: one already loaded (`load_reward_model`) for val/rm_score, else it is loaded here."""
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
        rm = reward_model if reward_model is not None else load_reward_model(name, testbed=testbed)
        say(f"  validation: scoring {len(rows)} answers with {rm.name}")
        scores = rm.score(prompts, [row["response"] for row in rows], progress=progress)
        for row, s in zip(rows, scores, strict=True):
            row["rm"] = float(s)
        metrics["val/rm_score"] = float(np.mean(scores))
        metrics["val/reward_model"] = name
    return metrics, rows


def checkpoint_steps(fractions: list[float], max_steps: int) -> list[int]:
    """The optimizer steps at which the fractions of training fall (at least step 1, at most the last; repeats
    dropped), in increasing order."""
    return sorted({min(max_steps, max(1, round(f * max_steps))) for f in fractions})


def checkpoint_selector(plan: Any, *, testbed: bool, say: Any = print) -> Any:
    """A `transformers.TrainerCallback` picking the run's weights on validation (see the module docstring); its
    ``history`` (one dict per evaluated step) and ``best_step`` are read after training."""
    from transformers import TrainerCallback

    from tvkd.benchmarks.rm_score import load_reward_model

    cfg = plan.cfg
    metric = f"val/{cfg.eval.checkpoint_metric}"
    name = validation_reward_model(cfg, testbed)

    class CheckpointSelector(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.history: list[dict[str, Any]] = []
            self.best_step: int | None = None
            self.best_score = float("-inf")
            self._best_state: dict[str, Any] | None = None
            self._rm: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.steps = checkpoint_steps(list(cfg.eval.checkpoints), int(state.max_steps))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = int(state.global_step)
            if step not in self.steps or model is None:
                return
            if self._rm is None and name is not None:
                self._rm = load_reward_model(name, testbed=testbed)
            was_training = model.training
            model.eval()
            try:
                metrics, _ = evaluate_validation(model, plan.tokenizer, plan.validation, cfg, testbed=testbed,
                                                 progress=False, say=lambda msg: None, reward_model=self._rm)
            finally:
                model.train(was_training)
            score = float(metrics[metric])
            self.history.append({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, float)}})
            say(f"  checkpoint step {step}/{state.max_steps}: {metric}={score:.4f}")
            if score > self.best_score:
                self.best_score, self.best_step = score, step
                self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if self._best_state is not None and model is not None and self.best_step != int(state.global_step):
                model.load_state_dict(self._best_state)
            self._best_state = None

    return CheckpointSelector()
