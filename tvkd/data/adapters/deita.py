"""The HuggingFaceH4/deita-10k-v0-sft adapter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tvkd.data.adapters import ADAPTERS, AdapterContext, Skip
from tvkd.data.adapters.generic import generic_sft
from tvkd.data.examples import SFTExample


@ADAPTERS.register(
    "deita_sft",
    kind="sft",
    hub_ids=("HuggingFaceH4/deita-10k-v0-sft",),
    columns=(frozenset({"prompt", "prompt_id", "messages"}),),
    split_aliases={"train": ("train_sft",), "test": ("test_sft",)},
    description="HuggingFaceH4/deita-10k-v0-sft: messages conversations, id = prompt_id; "
    "train/test map to train_sft/test_sft",
)
def deita_sft(table: Any, ctx: AdapterContext) -> Iterator[SFTExample | Skip]:
    # `prompt` repeats the first user turn of `messages`; the conversation is the record.
    yield from generic_sft(table, ctx)
