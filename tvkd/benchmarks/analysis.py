"""The analysis metrics of docs/methods.md §A.6 on any run, as benchmarks of `tvkd eval`.

- ``margin``: the student's implicit-reward margin accuracy on the run's test pairs (Table 5's score);
- ``value-kl``: value-alignment KL and policy KL between the run's teacher and the model (Table 4);
- ``teacher-scores``: the teacher's margin accuracy by Σ log π_T, mean log π_T and the shaping sum (Table 3).

Each re-plans the run from its config (data and caches are read back, nothing is trained) and runs the
evaluator the training pipeline runs, on the model being evaluated.
"""

from __future__ import annotations

from typing import Any

from tvkd.benchmarks import BENCHMARKS, BenchContext, positive_int


def _evaluate(ctx: BenchContext, evaluator: str, overrides: dict[str, Any], n_key: str) -> dict[str, Any]:
    """The evaluator's metrics and its sample size under ``n_key`` (test pairs, or training responses measured)."""
    from dataclasses import replace

    from tvkd.evaluation import EVALUATORS, EvalContext
    from tvkd.modeling import ModelSource
    from tvkd.pipeline import plan_run, uses_testbed

    if ctx.config is None:
        raise ValueError(f"the {evaluator} benchmark needs a run (its config names the data and the teacher), "
                         "not a bare model folder")
    cfg = replace(ctx.config, eval=replace(ctx.config.eval, **overrides))
    plan = plan_run(cfg, progress=ctx.progress, echo=lambda msg: None)
    m = cfg.models
    teacher = ModelSource.from_path(plan.paths["teacher"], dtype=cfg.cache.dtype or m.dtype) \
        if plan.paths["teacher"] else None
    if evaluator in ("value_alignment", "teacher_scores") and teacher is None:
        raise ValueError(f"the run has no teacher (models.teacher) for {evaluator}")
    ectx = EvalContext(cfg=cfg, policy=ctx.model(), tokenizer=plan.tokenizer, pad_id=plan.pad_id,
                       settings=plan.loss.eval_settings(plan.loss_cfg), train=plan.tokenized_train,
                       test=plan.tokenized_test, test_examples=plan.test_data.examples if plan.test_data else None,
                       reference=ModelSource.from_path(plan.paths["reference"], dtype=m.dtype), teacher=teacher,
                       teacher_vocab=plan.teacher_vocab, teacher_signal=True, testbed=uses_testbed(cfg),
                       progress=ctx.progress)
    from tvkd.cross_tokenizer import for_evaluator

    # a teacher of another tokenizer: its own tokenization of the test pairs, or a refusal naming why
    out = dict(EVALUATORS.get(evaluator)(for_evaluator(ectx, plan.teacher_tokens, evaluator)))
    if evaluator == "value_alignment":
        n = min(int(cfg.eval.value_alignment), len(plan.tokenized_train.dataset))
    else:
        n = len(plan.tokenized_test.dataset) if plan.tokenized_test is not None else 0
    out[n_key] = int(n)
    return out


@BENCHMARKS.register("margin", description="implicit-reward margin accuracy on the run's test pairs (Table 5)",
                     prefixes=("margin_accuracy/",))
def margin(ctx: BenchContext) -> dict[str, Any]:
    return _evaluate(ctx, "margin_accuracy", {"margin_accuracy": True}, "margin_accuracy/n")


@BENCHMARKS.register("value-kl", description="value-alignment KL and policy KL to the run's teacher (Table 4)",
                     options={"n": "chosen training responses to measure on (default 200)"},
                     values={"n": positive_int}, prefixes=("value_kl/",))
def value_kl(ctx: BenchContext) -> dict[str, Any]:
    n = int(ctx.option("n", 200))
    if n < 1:
        raise ValueError(f"value-kl: n must be >= 1, got {n}")
    return _evaluate(ctx, "value_alignment", {"value_alignment": n}, "value_kl/n")


@BENCHMARKS.register("teacher-scores", description="the teacher's margin accuracy by score (Table 3)")
def teacher_scores(ctx: BenchContext) -> dict[str, Any]:
    return _evaluate(ctx, "teacher_scores", {"teacher_scores": True}, "teacher_scores/n")
