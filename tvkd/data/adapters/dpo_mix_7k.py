"""The argilla/dpo-mix-7k adapter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tvkd.data.adapters import ADAPTERS, AdapterContext, Skip, number_field, preference_example
from tvkd.data.errors import FieldProblem, describe
from tvkd.data.examples import PreferenceExample


@ADAPTERS.register(
    "dpo_mix_7k",
    kind="preference",
    hub_ids=("argilla/dpo-mix-7k",),
    columns=(frozenset({"dataset", "chosen", "rejected", "chosen_rating", "rejected_rating"}),),
    description="argilla/dpo-mix-7k: implicit-prompt conversations, ratings and source data set kept in meta",
)
def dpo_mix_7k(table: Any, ctx: AdapterContext) -> Iterator[PreferenceExample | Skip]:
    for number, row in ctx.rows(table):
        with ctx.at(number):
            source_dataset = row.get("dataset")
            if source_dataset is not None and not isinstance(source_dataset, str):
                raise FieldProblem(
                    "dataset", f"expected the source data set's name, got {describe(source_dataset)}"
                )
            meta = {
                "source_dataset": source_dataset,
                "chosen_rating": number_field(row, "chosen_rating", optional=True),
                "rejected_rating": number_field(row, "rejected_rating", optional=True),
            }
            yield preference_example(ctx, row, number, meta)
