"""The nvidia/HelpSteer2 (ratings data and the preference file) adapters."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from tvkd.data.adapters import ADAPTERS, AdapterContext, Skip, integer_field, string_field
from tvkd.data.adapters.generic import generic_preferences
from tvkd.data.errors import DataError, FieldProblem, describe
from tvkd.data.examples import Message, PreferenceExample
from tvkd.data.messages import preference_skip_reason, user

HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
# Multi-turn HelpSteer2 prompts are flattened with SteerLM turn markers:
# "{user 1}\n<extra_id_1>Assistant\n{assistant 1}\n<extra_id_1>User\n{user 2}".
_STEERLM_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")


def steerlm_prompt_messages(text: str, field: str = "prompt") -> list[Message]:
    """Split a HelpSteer2 prompt into chat messages (a single turn stays one user message)."""
    parts = _STEERLM_TURN.split(text)
    messages = [user(parts[0])]
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": role.lower(), "content": content})
    if messages[-1]["role"] != "user":
        raise FieldProblem(
            field,
            "the multi-turn prompt ends with an assistant turn; it must end with the user turn the response answers",
        )
    return messages


def _rated_response(row: Mapping[str, Any]) -> tuple[str, str, dict[str, int]]:
    prompt, response = string_field(row, "prompt"), string_field(row, "response")
    attributes = {a: integer_field(row, a, 0, 4) for a in HELPSTEER2_ATTRIBUTES}
    return prompt, response, attributes


def _pair_skip_reason(prompt: list[Message], a: str, b: str) -> str | None:
    return preference_skip_reason(
        prompt, [{"role": "assistant", "content": a}], [{"role": "assistant", "content": b}]
    )


@ADAPTERS.register(
    "helpsteer2",
    kind="preference",
    hub_ids=("nvidia/HelpSteer2",),
    columns=(frozenset({"prompt", "response", *HELPSTEER2_ATTRIBUTES}),),
    split_aliases={"test": ("validation",)},
    description="nvidia/HelpSteer2 ratings: consecutive rows are one prompt's two responses; higher "
    "helpfulness is chosen, equal helpfulness skipped; validation serves as test",
)
def helpsteer2(table: Any, ctx: AdapterContext) -> Iterator[PreferenceExample | Skip]:
    rows = ctx.rows(table)
    for a_number, a in rows:
        second = next(rows, None)
        if second is None:
            ctx.fail(
                a_number,
                "HelpSteer2 pairs consecutive rows (0 & 1, 2 & 3, ...), but this last row has no partner: "
                "the split has an odd number of rows",
                fix="Load the complete, unfiltered split.",
            )
        b_number, b = second
        with ctx.at(a_number):
            prompt_a, response_a, attrs_a = _rated_response(a)
        with ctx.at(b_number):
            prompt_b, response_b, attrs_b = _rated_response(b)
        with ctx.at((a_number, b_number)):
            if prompt_a != prompt_b:
                raise FieldProblem(
                    "prompt",
                    f"consecutive rows must be the two responses to one prompt, but the prompts differ "
                    f"({describe(prompt_a, 40)} vs {describe(prompt_b, 40)})",
                    "Load the original split in its original order (pairs are rows 0 & 1, 2 & 3, ...).",
                )
            prompt = steerlm_prompt_messages(prompt_a)
        reason = _pair_skip_reason(prompt, response_a, response_b)
        if reason is None and attrs_a["helpfulness"] == attrs_b["helpfulness"]:
            reason = "equal_helpfulness"  # the paper drops these pairs
        if reason:
            yield Skip(reason, (a_number, b_number))
            continue
        a_wins = attrs_a["helpfulness"] > attrs_b["helpfulness"]
        (w_number, w_response, w_attrs), (l_response, l_attrs) = (
            ((a_number, response_a, attrs_a), (response_b, attrs_b))
            if a_wins
            else ((b_number, response_b, attrs_b), (response_a, attrs_a))
        )
        meta = {
            **ctx.base_meta(a_number, "conversational"),
            "rows": [a_number, b_number],
            "chosen_row": w_number,
            "helpfulness_gap": w_attrs["helpfulness"] - l_attrs["helpfulness"],
            "chosen_attributes": w_attrs,
            "rejected_attributes": l_attrs,
        }
        yield PreferenceExample(
            ctx.default_id(a_number),
            prompt,
            [{"role": "assistant", "content": w_response}],
            [{"role": "assistant", "content": l_response}],
            meta,
        )


# The preference file's `split` column: requested split -> accepted values. Its card calls the
# second part "validation"; the file itself writes "val".
_PREFERENCE_SPLITS = {"train": ("train",), "validation": ("val", "validation"), "test": ("val", "validation")}
_PREFERENCE_SPLITS["val"] = _PREFERENCE_SPLITS["validation"]


@ADAPTERS.register(
    "helpsteer2_preference",
    kind="preference",
    columns=(frozenset({"split", "prompt", "response_1", "response_2", "preference_strength"}),),
    data_dir="preference",
    source_split="train",
    description="nvidia/HelpSteer2 preference file (preference/preference.jsonl.gz): strength -3..3, "
    "negative = response 1 better, 0 skipped; its split column selects train or val (= test)",
)
def helpsteer2preference_example(table: Any, ctx: AdapterContext) -> Iterator[PreferenceExample | Skip]:
    wanted = _PREFERENCE_SPLITS.get(ctx.requested_split)
    if wanted is None:
        raise DataError(
            ctx.label,
            f"unknown split {ctx.requested_split!r} for the HelpSteer2 preference file",
            fix=f"Use one of {', '.join(sorted(_PREFERENCE_SPLITS))}.",
        )
    # The whole file is one source split; report (and stamp into meta) the part selected.
    ctx.split = wanted[0]
    known = {v for values in _PREFERENCE_SPLITS.values() for v in values}
    selected = []
    for number, value in enumerate(table["split"]):
        if value not in known:
            ctx.fail(number, f"expected 'train' or 'val', got {describe(value)}", field="split")
        if value in wanted:
            selected.append(number)
    for number, row in ctx.rows(table.select(selected), numbers=selected):
        with ctx.at(number):
            prompt = steerlm_prompt_messages(string_field(row, "prompt"))
            response_1, response_2 = string_field(row, "response_1"), string_field(row, "response_2")
            strength = integer_field(row, "preference_strength", -3, 3)
            statement = row.get("preference_statement")
            elaboration = row.get("preference_elaboration")
            annotations = row.get("all_preferences_unprocessed")
        reason = _pair_skip_reason(prompt, response_1, response_2)
        if reason is None and strength == 0:
            reason = "zero_preference_strength"
        if reason:
            yield Skip(reason, (number,))
            continue
        # Negative strength: response 1 is better (the card's scale, -3 = "much better").
        chosen, rejected = (response_1, response_2) if strength < 0 else (response_2, response_1)
        meta = {
            **ctx.base_meta(number, "conversational"),
            "split": row["split"],
            "preference_strength": strength,
            "chosen_response": 1 if strength < 0 else 2,
            "preference_statement": statement if isinstance(statement, str) else None,
            "preference_elaboration": elaboration if isinstance(elaboration, str) else None,
            "num_annotations": len(annotations) if isinstance(annotations, list) else None,
        }
        yield PreferenceExample(
            ctx.default_id(number, split="preference"),
            prompt,
            [{"role": "assistant", "content": chosen}],
            [{"role": "assistant", "content": rejected}],
            meta,
        )


# gx-ai-architect/HelpSteer2_DPO: the conversion the TVKD repository trained on. Its scripts read
# `chosen` / `rejected` as full conversations (prompt = conversation[:-1]) from splits train and
# test, which is the generic implicit-prompt format; any other column passes through unused.
ADAPTERS.add(
    "helpsteer2_dpo",
    generic_preferences,
    kind="preference",
    hub_ids=("gx-ai-architect/HelpSteer2_DPO",),
    columns=(),
    description="gx-ai-architect/HelpSteer2_DPO: implicit-prompt chosen/rejected conversations (generic reader)",
)
