"""Evaluation of a trained student: evaluators registered with the inputs they need.

Each evaluator is a function ``(ctx: EvalContext) -> dict[str, float]`` in its own module of this
package (or of a package in the ``tvkd.evaluators`` entry-point group), registered with

- ``switch``: the `EvalConfig` field that turns it on (a true value or a positive count);
- ``inputs``: what it reads besides the trained policy, from `INPUTS`; the pipeline runs it only
  when every input is available (a run without a teacher skips teacher-based evaluators);
- ``description``.

`run_evaluators` is how the pipeline evaluates: it reads this registry, so a new evaluator is one
file. Pure metric functions (margin accuracy, value alignment, ...) live in `metrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tvkd.api import EvalSettings
from tvkd.registry import Discovery, Registry

EVALUATORS: Registry[Callable[..., dict[str, Any]]] = Registry(
    "evaluator", Discovery(packages=("tvkd.evaluation",), entry_points="tvkd.evaluators")
)

INPUTS = {
    "test_pairs": "held-out preference pairs (data.test_source)",
    "teacher": "a teacher model (models.teacher)",
    "teacher_signal": "a loss that trains with a teacher signal (it needs teacher columns)",
    "testbed": "the testbed's oracle (any testbed:<part> in the config)",
}


@dataclass
class EvalContext:
    """Everything an evaluator may read. Models are `ModelSource`s: loaded only if an evaluator asks."""

    cfg: Any  # tvkd.config.RunConfig
    policy: Any  # the trained student, in eval mode
    tokenizer: Any
    pad_id: int
    settings: EvalSettings  # from the loss's config
    train: Any  # TokenizedData of the training pairs
    test: Any | None  # TokenizedData of the test pairs
    test_examples: list | None  # their PreferenceExamples (prompts for generation)
    reference: Any  # ModelSource
    teacher: Any | None  # ModelSource
    teacher_vocab: int | None
    teacher_signal: bool
    testbed: bool
    progress: bool = True
    outputs: list[dict[str, Any]] | None = None  # generations, written to outputs.jsonl
    # per-item results behind the metrics, e.g. {"pairs": [{"id": ..., "margin_accuracy": 1.0}, ...]}, written to
    # <name>.jsonl: studies compute paired effect sizes from them
    items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def available(self, name: str) -> bool:
        if name not in INPUTS:
            raise ValueError(f"unknown evaluator input {name!r}; valid: {', '.join(INPUTS)}")
        return {"test_pairs": self.test is not None, "teacher": self.teacher is not None,
                "teacher_signal": self.teacher_signal, "testbed": self.testbed}[name]


def enabled(cfg_eval: Any, name: str) -> bool:
    """Whether the run config turns the evaluator on (its switch is true or a positive count)."""
    return bool(getattr(cfg_eval, EVALUATORS.meta(name)["switch"]))


def wanted_inputs(cfg_eval: Any) -> set[str]:
    """The inputs that the evaluators this config turns on read (e.g. ``test_pairs``: load the held-out pairs)."""
    return {i for name in EVALUATORS.names() if enabled(cfg_eval, name) for i in EVALUATORS.meta(name)["inputs"]}


def run_evaluators(ctx: EvalContext, say: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Run every registered evaluator the config turns on and whose inputs are available."""
    metrics: dict[str, Any] = {}
    for name in sorted(EVALUATORS.names(), key=lambda n: (EVALUATORS.meta(n).get("order", 100), n)):
        meta = EVALUATORS.meta(name)
        if not enabled(ctx.cfg.eval, name):
            continue
        missing = [i for i in meta["inputs"] if not ctx.available(i)]
        if missing:
            say(f"  {name}: skipped (needs {', '.join(INPUTS[i] for i in missing)})")
            continue
        metrics.update(EVALUATORS.get(name)(ctx))
    return metrics
