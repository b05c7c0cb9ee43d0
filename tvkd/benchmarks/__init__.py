"""Benchmarks run on a trained model by `tvkd eval`: one module each, registered into `BENCHMARKS`.

A benchmark is a function ``(ctx: BenchContext) -> dict[str, Any]`` returning the metrics to merge into
the run's metrics.json (keys prefixed by the benchmark, e.g. ``mt_bench/score``), registered with

    @BENCHMARKS.register("mt-bench", description="...", options={"judge_model": "help ...", ...},
                         values={"judge_tries": positive_int, ...})

``options`` names and explains each option; ``values`` gives a rule per option (below), which `tvkd eval` applies
before any model loads or any judge is asked.

Each uses its benchmark's own ecosystem tool for the scoring (alpaca_eval, FastChat's judge prompts and
parsing, lm-eval, the reward model's own chat template); generations go through
`tvkd.evaluation.generations` (saved in the run folder, keyed by decoding, reused). Modules here keep
heavy imports (openai, alpaca_eval, lm_eval, fastchat) inside their functions: discovery imports every
module of this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvkd.registry import Discovery, Registry

BENCHMARKS: Registry[Callable[..., dict[str, Any]]] = Registry(
    "benchmark", Discovery(packages=("tvkd.benchmarks",), entry_points="tvkd.benchmarks")
)


# ---- option values, checked by `tvkd eval` before any model loads or any judge is asked -----------------------
# A benchmark registers ``values={option: rule}``; a rule returns None when the value fits, else what it expects.
Rule = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def positive_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 1 else "an integer >= 1"


def positive_number(v: Any) -> str | None:
    return None if _is_number(v) and v > 0 else "a number > 0"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def one_of(*choices: str) -> Rule:
    return lambda v: None if v in choices else "one of " + ", ".join(choices)


def http_url(v: Any) -> str | None:
    ok = isinstance(v, str) and v.startswith(("http://", "https://")) and len(v.split("://", 1)[1].strip("/")) > 0
    return None if ok else "an http:// or https:// URL, e.g. http://127.0.0.1:8765/v1"


def either(*rules: Rule) -> Rule:
    def rule(v: Any) -> str | None:
        problems = [r(v) for r in rules]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    return rule


def check_values(bench: str, options: dict[str, Any], rules: dict[str, Rule]) -> None:
    """ValueError naming the option, what it expects and what it got, for the first option of ``bench`` whose
    value its rule refuses."""
    for key, value in options.items():
        rule = rules.get(key)
        problem = rule(value) if rule is not None else None
        if problem:
            raise ValueError(f"--option {key}={value!r}: {bench} expects {problem}")


@dataclass
class BenchContext:
    """What a benchmark reads: the model to evaluate, where its run keeps things, and the user's options."""

    run_dir: Path  # outputs, generations and judge caches of this evaluation go here
    model_dir: Path  # a folder loadable with from_pretrained (the run's saved model, or a config's student)
    options: dict[str, Any] = field(default_factory=dict)  # the benchmark's options from the command line
    test_prompts: list[list[dict[str, Any]]] = field(default_factory=list)  # the run's test prompts (chats)
    testbed: bool = False  # the run's data are the testbed's: the oracle can score answers
    progress: bool = True
    say: Callable[[str], None] = print
    config: Any = None  # the run's RunConfig (None for a bare model folder)
    prompts_error: str | None = None  # why test_prompts could not be read (benchmarks that need them fail with it)
    _model: Any = None
    _tokenizer: Any = None

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tvkd.modeling import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def model(self) -> Any:
        """The causal LM, loaded once (safetensors only, eval mode)."""
        if self._model is None:
            from tvkd.modeling import load_causal_lm

            self._model = load_causal_lm(self.model_dir)
        return self._model

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)
