"""Benchmarks run on a trained model by `tvkd eval`: one module each, registered into `BENCHMARKS`.

A benchmark is a function ``(ctx: BenchContext) -> dict[str, Any]`` returning the metrics to merge into
the run's metrics.json (keys prefixed by the benchmark, e.g. ``mt_bench/score``), registered with

    @BENCHMARKS.register("mt-bench", description="...", options={"judge_model": "help ...", ...})

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
