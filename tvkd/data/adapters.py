"""Per-data-set adapters: one function per schema, turning source rows into examples.

An adapter is a generator ``adapter(table, ctx)`` that reads rows through ``ctx.rows(table)``
and yields :class:`PreferenceExample` / :class:`SFTExample` objects, or :class:`Skip` for a
well-formed row without a training signal (counted, never silent). Malformed rows raise
:class:`DataError` naming the source, row and field. Adapters register with their metadata:

* ``kind``: ``"preference"`` or ``"sft"``;
* ``hub_ids``: data sets the adapter is chosen for automatically (a hub id, or a local folder
  whose path ends in it, such as a mirror made with ``huggingface-cli download``);
* ``columns``: alternative column sets that select the adapter when the source has them (the
  adapter with the largest matching set wins; empty: selected only by name or hub id);
* ``split_aliases``: requested split -> the source's split names to try (e.g. HelpSteer2 has
  no test split; its validation split serves as test);
* ``data_dir``: a sub-folder of the repository to load (HelpSteer2's preference file).

Adding a data set is one decorated function here; loaders pick it up by name, hub id or columns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from tqdm.auto import tqdm

from tvkd.data.errors import DEFAULT_FIX, DataError, FieldProblem, describe
from tvkd.data.examples import Message, PreferenceExample, SFTExample
from tvkd.data.messages import (
    preference_from_row,
    preference_skip_reason,
    sft_from_row,
    sft_skip_reason,
    user,
)
from tvkd.registry import Registry

ADAPTERS: Registry = Registry("data adapter")


@dataclass(frozen=True)
class Skip:
    """A well-formed row (or pair of rows) that yields no example, and why."""

    reason: str
    rows: tuple[int, ...]


class AdapterContext:
    """What an adapter knows about its source: names for ids and errors, and the row iterator.

    ``label`` names the source in error messages (a file path, or ``"id (split 'x')"``);
    ``name`` and ``split`` build default ids ``f"{name}/{split}/{row}"``; ``requested_split``
    is the split the caller asked for (adapters that select rows by a column use it).
    """

    def __init__(self, label: str, name: str, split: str, requested_split: str, progress: bool = False):
        self.label = label
        self.name = name
        self.split = split
        self.requested_split = requested_split
        self.progress = progress
        self.rows_read = 0

    def rows(self, table: Any, numbers: Sequence[int] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(row_number, row)``; ``numbers`` gives the source row numbers of a selection."""
        numbers = range(len(table)) if numbers is None else numbers
        bar = tqdm(total=len(numbers), desc=f"reading {self.label}", unit="row", disable=not self.progress)
        try:
            for number, row in zip(numbers, table):
                self.rows_read += 1
                bar.update(1)
                yield number, row
        finally:
            bar.close()

    @contextmanager
    def at(self, rows: int | Sequence[int]) -> Iterator[None]:
        """Turn a :class:`FieldProblem` raised inside into a :class:`DataError` naming ``rows``."""
        try:
            yield
        except FieldProblem as p:
            raise DataError(self.label, p.problem, row=rows, field=p.field, fix=p.fix) from None

    def fail(
        self, rows: int | Sequence[int], problem: str, field: str | None = None, fix: str = DEFAULT_FIX
    ) -> NoReturn:
        raise DataError(self.label, problem, row=rows, field=field, fix=fix)

    def default_id(self, row_number: int, split: str | None = None) -> str:
        return f"{self.name}/{split or self.split}/{row_number}"

    def base_meta(self, row_number: int, fmt: str) -> dict[str, Any]:
        return {"format": fmt, "source": self.name, "split": self.split, "row": row_number}


def row_id(row: Mapping[str, Any], fields: Iterable[str] = ("id", "prompt_id")) -> str | None:
    """The row's own id from the first present id column, or None."""
    for field in fields:
        value = row.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise FieldProblem(field, f"an id must be a string or an integer, got {describe(value)}")
        if str(value).strip():
            return str(value)
    return None


def row_meta(row: Mapping[str, Any]) -> dict[str, Any]:
    """The optional ``meta`` column of generic rows (a JSON object)."""
    meta = row.get("meta")
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise FieldProblem("meta", f"expected a JSON object, got {describe(meta)}")
    return dict(meta)


def _number(row: Mapping[str, Any], field: str, optional: bool = False) -> float | int | None:
    value = row.get(field)
    if value is None and optional:
        return None
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldProblem(field, f"expected a number, got {describe(value)}")
    return value


def _integer_in(row: Mapping[str, Any], field: str, low: int, high: int) -> int:
    value = _number(row, field)
    if value != int(value) or not low <= value <= high:
        raise FieldProblem(field, f"expected an integer from {low} to {high}, got {describe(value)}")
    return int(value)


def _string(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise FieldProblem(field, "missing or null", "Add the field to the row or drop the row.")
    if not isinstance(value, str):
        raise FieldProblem(field, f"expected a string, got {describe(value)}")
    return value


def _preference(
    ctx: AdapterContext, row: Mapping[str, Any], number: int, extra_meta: Mapping[str, Any] | None = None
) -> PreferenceExample | Skip:
    """A generic TRL-format row -> example or skip (call inside ``ctx.at(number)``)."""
    prompt, chosen, rejected, fmt = preference_from_row(row)
    reason = preference_skip_reason(prompt, chosen, rejected)
    if reason:
        return Skip(reason, (number,))
    meta = {**row_meta(row), **(extra_meta or {}), **ctx.base_meta(number, fmt)}
    return PreferenceExample(row_id(row) or ctx.default_id(number), prompt, chosen, rejected, meta)


# --------------------------------------------------------------------------------------------
# Generic formats


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
            yield _preference(ctx, row, number)


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


# --------------------------------------------------------------------------------------------
# argilla/dpo-mix-7k


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
                "chosen_rating": _number(row, "chosen_rating", optional=True),
                "rejected_rating": _number(row, "rejected_rating", optional=True),
            }
            yield _preference(ctx, row, number, meta)


# --------------------------------------------------------------------------------------------
# nvidia/HelpSteer2 (ratings data and the preference file)

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
    prompt, response = _string(row, "prompt"), _string(row, "response")
    attributes = {a: _integer_in(row, a, 0, 4) for a in HELPSTEER2_ATTRIBUTES}
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
def helpsteer2_preference(table: Any, ctx: AdapterContext) -> Iterator[PreferenceExample | Skip]:
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
            prompt = steerlm_prompt_messages(_string(row, "prompt"))
            response_1, response_2 = _string(row, "response_1"), _string(row, "response_2")
            strength = _integer_in(row, "preference_strength", -3, 3)
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


# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# HuggingFaceH4/deita-10k-v0-sft


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
