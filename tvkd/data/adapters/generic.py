"""The generic formats: TRL-style preference rows and SFT rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tvkd.data.adapters import ADAPTERS, AdapterContext, Skip, preference_example, row_id, row_meta
from tvkd.data.examples import PreferenceExample, SFTExample
from tvkd.data.messages import sft_from_row, sft_skip_reason


@ADAPTERS.register(
    "preference",
    kind="preference",
    columns=(frozenset({"chosen", "rejected"}),),
    description="TRL preference rows: {prompt, chosen, rejected} (text or messages) or implicit-prompt "
    "conversations; optional id and meta columns",
)
def generic_preferences(table: Any, ctx: AdapterContext) -> Iterator[PreferenceExample | Skip]:
    for number, row in ctx.rows(table):
        with ctx.at(number):
            yield preference_example(ctx, row, number)


@ADAPTERS.register(
    "sft",
    kind="sft",
    columns=(frozenset({"messages"}), frozenset({"prompt", "completion"})),
    description="TRL SFT rows: {messages} or {prompt, completion}; optional id and meta columns",
)
def generic_sft(table: Any, ctx: AdapterContext) -> Iterator[SFTExample | Skip]:
    for number, row in ctx.rows(table):
        with ctx.at(number):
            messages, fmt = sft_from_row(row)
            reason = sft_skip_reason(messages)
            if reason:
                yield Skip(reason, (number,))
                continue
            meta = {**row_meta(row), **ctx.base_meta(number, fmt)}
            yield SFTExample(row_id(row) or ctx.default_id(number), messages, meta)
