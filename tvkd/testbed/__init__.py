"""The testbed: a deterministic synthetic preference world with a known oracle reward.

docs/testbed.md §1. ``build_testbed()`` builds (or loads from the
cache) a word-level tokenizer, tiny Llama teacher and student models in the Hugging Face format
and JSONL data sets, so every feature runs the code path of a real run on a laptop CPU::

    from tvkd.testbed import build_testbed, score
    tb = build_testbed()                      # ~2 minutes the first time, ~1 s when cached
    tb.teacher_dpo_dir, tb.pref_train         # hand these to anything that takes a hub id / a file
    score(prompt_text, response_text)         # the oracle reward r* ∈ [0, 1]
"""

from .build import STAGES, TESTBED_VERSION, Testbed, TestbedConfig, build_testbed, read_jsonl, stage_keys
from .tasks import exact_match, has_flaw, score

__all__ = [
    "STAGES",
    "TESTBED_VERSION",
    "Testbed",
    "TestbedConfig",
    "build_testbed",
    "exact_match",
    "has_flaw",
    "read_jsonl",
    "score",
    "stage_keys",
]
