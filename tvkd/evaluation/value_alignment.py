"""Value alignment of the student with the teacher (the paper's Table 4; docs/methods.md §A.6).

On the first `eval.value_alignment` chosen training responses: KL(teacher‖student) between the
softmax over positions of each model's soft values V(s_0..s_T), and the token-level policy KL,
at the loss's value temperature (`EvalSettings.value_temperature`; `DEFAULT_VALUE_TEMPERATURE` when the loss
has none).
"""

from __future__ import annotations

from typing import Any

from tvkd.evaluation import EVALUATORS, EvalContext
from tvkd.evaluation.metrics import value_alignment as value_alignment_metrics

#: β_V of a run whose loss has no value temperature (DPO, SFT): the paper's.
DEFAULT_VALUE_TEMPERATURE = 2.0


@EVALUATORS.register("value_alignment", switch="value_alignment", inputs=("teacher",), order=40,
                     description="Table 4: value-alignment KL and policy KL to the teacher")
def value_alignment(ctx: EvalContext) -> dict[str, Any]:
    train = ctx.train.dataset
    sub = train.select(range(min(int(ctx.cfg.eval.value_alignment), len(train))))
    beta_v = ctx.settings.value_temperature or DEFAULT_VALUE_TEMPERATURE
    out = value_alignment_metrics(ctx.teacher.get(), ctx.policy, sub, beta_v=beta_v, pad_id=ctx.pad_id,
                                  vocab_size=ctx.teacher_vocab)
    ctx.teacher.release()
    return out
