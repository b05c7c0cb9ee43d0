"""The validation split of a run (``data.validation_fraction``): training prompts held out by their content.

A prompt is held out when the hash of its text (the same JSON form `tvkd.evaluation.generation.unique_prompts`
dedups by) falls below the fraction: the choice depends on the prompt alone, not on the run's seed, method, row
order or ``data.limit``, so every run of a study holds out the same prompts, and every pair of a held-out prompt
goes with it (no prompt is both trained on and validated on). It is taken out before the run's seeded
``subsample``. The fraction held out is the expected one, not exact: about ``fraction × prompts``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["held_out", "prompt_key", "split_validation"]

_SALT = b"tvkd-validation-v1\0"


def prompt_key(prompt: Any) -> str:
    """A prompt (a list of messages, or text) as the JSON text it is hashed by: the one key of a prompt, with which
    the evaluators deduplicate prompts and key their stored generations too."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def held_out(prompt: Any, fraction: float) -> bool:
    """Whether the validation split of ``fraction`` holds this prompt: its hash, as a number in [0, 1), is below
    ``fraction`` (so a larger fraction holds out a superset of a smaller one's prompts)."""
    digest = hashlib.sha256(_SALT + prompt_key(prompt).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_validation(examples: Sequence[Any], fraction: float) -> tuple[list[Any], list[Any]]:
    """(training pairs, validation pairs) of ``examples`` (`PreferenceExample`s), each in the given order."""
    train, validation = [], []
    for ex in examples:
        (validation if held_out(ex.prompt, fraction) else train).append(ex)
    return train, validation
