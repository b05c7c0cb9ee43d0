"""tvkd.data: every adapter on its fixture, hub-id routing, and one test per kind of bad input.

The fixtures under tests/fixtures/ are invented rows in each data set's real schema and layout
(regenerate with tests/fixtures/make_fixtures.py). No test touches the network: hub ids are
routed to the fixture folders by replacing ``datasets.load_dataset``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import datasets
import pytest

from tvkd.data import (
    ADAPTERS,
    DataError,
    LoadResult,
    PreferenceExample,
    SFTExample,
    inspect_source,
    load_preferences,
    load_sft,
    render_example,
)
from tvkd.registry import UnknownNameError

FIXTURES = Path(__file__).parent / "fixtures"
GENERIC = FIXTURES / "generic"
DPO_MIX = FIXTURES / "argilla" / "dpo-mix-7k"
HELPSTEER2 = FIXTURES / "nvidia" / "HelpSteer2"
HELPSTEER2_DPO = FIXTURES / "gx-ai-architect" / "HelpSteer2_DPO"
DEITA = FIXTURES / "HuggingFaceH4" / "deita-10k-v0-sft"


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def roles(messages: list[dict]) -> list[str]:
    return [m["role"] for m in messages]


# --------------------------------------------------------------------------------------------
# argilla/dpo-mix-7k


def test_dpo_mix_7k_train_counts_prompt_and_meta():
    result = load_preferences(DPO_MIX, split="train")
    assert result.adapter == "dpo_mix_7k"
    assert (result.num_rows, len(result.examples)) == (20, 18)
    assert result.skipped == {"empty_response": 1, "identical_pair": 1}
    ids = [ex.id for ex in result.examples]
    assert ids[0] == "argilla/dpo-mix-7k/train/0"
    assert "argilla/dpo-mix-7k/train/5" not in ids and "argilla/dpo-mix-7k/train/11" not in ids

    raw = datasets.load_dataset(str(DPO_MIX), split="train")
    for ex in result.examples:
        row = raw[ex.meta["row"]]
        # The prompt is chosen[:-1]; the responses are the last (assistant) messages only.
        assert ex.prompt == [{"role": m["role"], "content": m["content"]} for m in row["chosen"][:-1]]
        assert ex.chosen == [{"role": "assistant", "content": row["chosen"][-1]["content"]}]
        assert ex.rejected == [{"role": "assistant", "content": row["rejected"][-1]["content"]}]
        assert ex.meta["source_dataset"] == row["dataset"]
        assert ex.meta["chosen_rating"] == row["chosen_rating"]
        assert ex.meta["rejected_rating"] == row["rejected_rating"]
        assert ex.meta["format"] == "conversational" and not ex.is_text
    multi_turn = result.examples[0]
    assert roles(multi_turn.prompt) == ["user", "assistant", "user"]
    with_system = result.examples[1]
    assert roles(with_system.prompt) == ["system", "user"]


def test_dpo_mix_7k_test_split():
    result = load_preferences(DPO_MIX, split="test")
    assert (result.split, result.num_rows, len(result), result.skipped) == ("test", 6, 6, {})


# --------------------------------------------------------------------------------------------
# nvidia/HelpSteer2: ratings (pairs of consecutive rows)


def test_helpsteer2_pairs_consecutive_rows_by_helpfulness():
    result = load_preferences(HELPSTEER2, split="train")
    assert result.adapter == "helpsteer2"
    assert (result.num_rows, len(result.examples)) == (20, 6)
    assert result.skipped == {"equal_helpfulness": 2, "empty_response": 1, "identical_pair": 1}

    raw = read_jsonl_gz(HELPSTEER2 / "train.jsonl.gz")
    for ex in result.examples:
        a, b = ex.meta["rows"]
        assert b == a + 1 and a % 2 == 0
        winner, loser = (
            (raw[a], raw[b]) if raw[a]["helpfulness"] > raw[b]["helpfulness"] else (raw[b], raw[a])
        )
        assert ex.meta["chosen_row"] == (a if winner is raw[a] else b)
        assert ex.chosen == [{"role": "assistant", "content": winner["response"]}]
        assert ex.rejected == [{"role": "assistant", "content": loser["response"]}]
        assert ex.meta["helpfulness_gap"] == winner["helpfulness"] - loser["helpfulness"] > 0
        for attribute in ("helpfulness", "correctness", "coherence", "complexity", "verbosity"):
            assert ex.meta["chosen_attributes"][attribute] == winner[attribute]
            assert ex.meta["rejected_attributes"][attribute] == loser[attribute]
        assert ex.id == f"nvidia/HelpSteer2/train/{a}"

    by_id = {ex.id: ex for ex in result.examples}
    assert by_id["nvidia/HelpSteer2/train/2"].meta["chosen_row"] == 3  # the second response won
    # A multi-turn prompt is split at its SteerLM turn markers into chat messages.
    multi = by_id["nvidia/HelpSteer2/train/6"]
    assert roles(multi.prompt) == ["user", "assistant", "user"]
    assert "<extra_id_1>" not in "".join(m["content"] for m in multi.prompt)
    assert multi.prompt[0]["content"] == raw[6]["prompt"].split("\n<extra_id_1>")[0]


def test_helpsteer2_validation_serves_as_test():
    result = load_preferences(HELPSTEER2, split="test")
    assert (result.split, result.num_rows, len(result)) == ("validation", 8, 3)
    assert result.skipped == {"equal_helpfulness": 1}
    assert result.examples[0].id == "nvidia/HelpSteer2/validation/0"


# --------------------------------------------------------------------------------------------
# nvidia/HelpSteer2: the preference file


@pytest.mark.parametrize(
    "split, n_rows, n_examples, skipped",
    [
        ("train", 16, 13, {"zero_preference_strength": 2, "empty_response": 1}),
        ("test", 4, 3, {"identical_pair": 1}),
    ],
)
def test_helpsteer2_preference_file(split, n_rows, n_examples, skipped):
    result = load_preferences(HELPSTEER2, split=split, adapter="helpsteer2_preference")
    assert (result.num_rows, len(result.examples), result.skipped) == (n_rows, n_examples, skipped)
    raw = read_jsonl_gz(HELPSTEER2 / "preference" / "preference.jsonl.gz")
    for ex in result.examples:
        row = raw[ex.meta["row"]]
        assert row["split"] == ("train" if split == "train" else "val")
        strength = row["preference_strength"]
        # Negative strength: response 1 is better.
        better, worse = (
            (row["response_1"], row["response_2"]) if strength < 0 else (row["response_2"], row["response_1"])
        )
        assert (ex.chosen[0]["content"], ex.rejected[0]["content"]) == (better, worse)
        assert ex.meta["preference_strength"] == strength != 0
        assert ex.meta["preference_statement"] == row["preference_statement"]
        assert ex.meta["num_annotations"] == len(row["all_preferences_unprocessed"])
        assert ex.id == f"nvidia/HelpSteer2/preference/{ex.meta['row']}"


def test_helpsteer2_preference_file_is_recognised_by_its_columns():
    result = load_preferences(HELPSTEER2 / "preference" / "preference.jsonl.gz", split="validation")
    assert (result.adapter, len(result), result.skipped) == (
        "helpsteer2_preference",
        3,
        {"identical_pair": 1},
    )


def test_helpsteer2_dpo_conversion_reads_full_conversations():
    result = load_preferences(HELPSTEER2_DPO, split="train")
    assert (result.adapter, result.num_rows, len(result)) == ("helpsteer2_dpo", 10, 10)
    ex = result.examples[0]
    assert roles(ex.prompt) == ["user"] and roles(ex.chosen) == roles(ex.rejected) == ["assistant"]


# --------------------------------------------------------------------------------------------
# HuggingFaceH4/deita-10k-v0-sft


def test_deita_sft_splits_ids_and_skips():
    result = load_sft(DEITA, split="train")
    assert (result.adapter, result.split, result.kind) == ("deita_sft", "train_sft", "sft")
    assert (result.num_rows, len(result.examples), result.skipped) == (20, 19, {"empty_response": 1})
    raw = datasets.load_dataset(str(DEITA), split="train_sft")
    for ex in result.examples:
        assert isinstance(ex, SFTExample)
        row = raw[ex.meta["row"]]
        assert ex.id == row["prompt_id"]
        assert ex.messages == [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        assert ex.messages[-1]["role"] == "assistant"
    assert any(ex.messages[0]["role"] == "system" for ex in result.examples)
    assert any(len(ex.messages) > 2 for ex in result.examples)

    test = load_sft(DEITA, split="test")
    assert (test.split, len(test)) == ("test_sft", 6)
    assert len(load_sft(DEITA, split="train_gen")) == 3


def test_sft_source_is_not_preference_data():
    with pytest.raises(DataError, match="no preference adapter fits the columns messages, prompt, prompt_id"):
        load_preferences(DEITA, split="train_sft")


# --------------------------------------------------------------------------------------------
# Generic TRL formats


def test_generic_plain_text_rows_keep_text_format_ids_and_meta():
    result = load_preferences(GENERIC / "explicit_text.jsonl")
    assert (result.adapter, result.num_rows, len(result), result.skipped) == (
        "preference",
        6,
        5,
        {"identical_pair": 1},
    )
    ex = result.examples[0]
    assert ex.id == "text-0" and ex.is_text and ex.meta["format"] == "text"
    assert ex.meta["topic"] == "quiz" and ex.meta["n"] == 0
    assert ex.prompt == [
        {"role": "user", "content": "What colour do you get by mixing blue and yellow paint?"}
    ]
    assert ex.chosen == [{"role": "assistant", "content": "Green."}]


def test_generic_explicit_conversational_rows():
    result = load_preferences(GENERIC / "explicit_conversational.jsonl")
    assert (len(result), result.skipped) == (4, {"empty_response": 1})
    by_row = {ex.meta["row"]: ex for ex in result.examples}
    assert roles(by_row[1].prompt) == ["system", "user"]
    assert roles(by_row[2].prompt) == ["user"]  # a string prompt becomes one user message
    assert by_row[0].id == "explicit_conversational/train/0"
    assert all(ex.meta["format"] == "conversational" for ex in result.examples)


def test_generic_implicit_prompt_is_the_shared_prefix():
    result = load_preferences(GENERIC / "implicit_conversational.jsonl")
    assert len(result) == 5
    multi = result.examples[2]
    assert roles(multi.prompt) == ["user", "assistant", "user"]
    assert roles(multi.chosen) == roles(multi.rejected) == ["assistant"]


def test_generic_sft_formats():
    messages = load_sft(GENERIC / "sft_messages.jsonl")
    assert (messages.adapter, len(messages)) == ("sft", 4)
    assert messages.examples[0].id == "s0" and not messages.examples[0].is_text
    text = load_sft(GENERIC / "sft_prompt_completion.jsonl")
    assert len(text) == 4 and text.examples[0].is_text
    assert roles(text.examples[0].messages) == ["user", "assistant"]


# --------------------------------------------------------------------------------------------
# Hub ids route to the right adapter (datasets.load_dataset is pointed at the fixtures)


@pytest.mark.parametrize(
    "hub_id, split, adapter, loader, expected_call, expected_adapter, n",
    [
        ("argilla/dpo-mix-7k", "train", None, load_preferences, {"split": "train"}, "dpo_mix_7k", 18),
        ("nvidia/HelpSteer2", "test", None, load_preferences, {"split": "validation"}, "helpsteer2", 3),
        (
            "nvidia/HelpSteer2",
            "test",
            "helpsteer2_preference",
            load_preferences,
            {"split": "train", "data_dir": "preference"},
            "helpsteer2_preference",
            3,
        ),
        (
            "gx-ai-architect/HelpSteer2_DPO",
            "test",
            None,
            load_preferences,
            {"split": "test"},
            "helpsteer2_dpo",
            4,
        ),
        ("HuggingFaceH4/deita-10k-v0-sft", "train", None, load_sft, {"split": "train_sft"}, "deita_sft", 19),
    ],
)
def test_hub_id_routes_to_its_adapter(
    monkeypatch, hub_id, split, adapter, loader, expected_call, expected_adapter, n
):
    real_load_dataset = datasets.load_dataset
    calls = []

    def from_fixtures(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return real_load_dataset(str(FIXTURES / path), *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", from_fixtures)
    result = loader(hub_id, split=split, adapter=adapter)
    assert calls == [(hub_id, (), expected_call)]
    assert (result.adapter, len(result), result.source) == (expected_adapter, n, hub_id)
    assert result.examples[0].meta["source"] == hub_id  # default ids are f"{hub_id}/{split}/{row}"


def test_every_hub_id_has_a_fixture():
    hub_ids = {h for name in ADAPTERS for h in ADAPTERS.meta(name).get("hub_ids", ())}
    assert hub_ids == {
        "argilla/dpo-mix-7k",
        "nvidia/HelpSteer2",
        "gx-ai-architect/HelpSteer2_DPO",
        "HuggingFaceH4/deita-10k-v0-sft",
    }
    assert all((FIXTURES / h).is_dir() for h in hub_ids)


# --------------------------------------------------------------------------------------------
# Bad input: the message names the file, the row, the field and what is wrong


@pytest.mark.parametrize(
    "filename, rows, field, problem",
    [
        (
            "bad_chosen_type.jsonl",
            (2,),
            "chosen",
            "expected a string or a list of {role, content} messages, got int 3",
        ),
        ("bad_missing_rejected.jsonl", (2,), "rejected", "missing or null"),
        ("bad_message_no_role.jsonl", (2,), "chosen", "message 0 has no 'role'"),
        ("bad_unknown_role.jsonl", (2,), "prompt", "unknown role 'human'"),
        ("bad_prompt_mismatch.jsonl", (2,), "rejected", "prompt mismatch"),
        ("bad_last_not_assistant.jsonl", (2,), "chosen", "the last message must be the assistant's response"),
        ("helpsteer2_unpaired.jsonl", (2, 3), "prompt", "the prompts differ"),
        ("helpsteer2_bad_rating.jsonl", (1,), "helpfulness", "expected an integer from 0 to 4, got int 7"),
        ("helpsteer2_odd_rows.jsonl", (2,), None, "has no partner"),
        ("helpsteer2_preference_bad_strength.jsonl", (1,), "preference_strength", "from -3 to 3, got int 5"),
    ],
)
def test_bad_preference_row_is_named(filename, rows, field, problem):
    path = GENERIC / filename
    with pytest.raises(DataError) as info:
        load_preferences(path)
    err, message = info.value, str(info.value)
    assert message.startswith(f"{path} row" if len(rows) == 1 else f"{path} rows")
    where = f"row {rows[0]}" if len(rows) == 1 else f"rows {rows[0]} and {rows[1]}"
    assert where in message and problem in message
    assert (err.rows, err.field) == (rows, field)
    if field:
        assert f"field '{field}'" in message
    assert message.rstrip().endswith(".") and err.fix  # it says how to fix it


def test_bad_sft_row_is_named():
    path = GENERIC / "bad_sft_last_user.jsonl"
    with pytest.raises(
        DataError, match=r"bad_sft_last_user\.jsonl row 2, field 'messages': the last message"
    ):
        load_sft(path)


def test_invalid_json_line_is_named():
    path = GENERIC / "bad_json_syntax.jsonl"
    with pytest.raises(DataError, match=r"bad_json_syntax\.jsonl line 3: not valid JSON"):
        load_preferences(path)


def test_data_error_message_format():
    err = DataError(
        "dpo.jsonl",
        "expected a string or a list of {role, content} messages, got int 3",
        row=17,
        field="chosen",
    )
    assert str(err) == (
        "dpo.jsonl row 17, field 'chosen': expected a string or a list of {role, content} "
        "messages, got int 3. Fix the row or drop it."
    )
    assert isinstance(err, ValueError)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "bad_row, field, problem",
    [
        (
            {"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
            "rejected",
            "same form",
        ),
        (
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
            "prompt",
            "plain-text prompt",
        ),
        ({"chosen": "a", "rejected": "b"}, "prompt", "missing or null"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "meta": [1]}, "meta", "expected a JSON object"),
        (
            {
                "prompt": [{"role": "user", "content": 5}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "prompt",
            "content must be a string",
        ),
        (
            {
                "prompt": "q",
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "x"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "chosen",
            "holds only assistant messages",
        ),
    ],
)
def test_more_malformed_rows(tmp_path, bad_row, field, problem):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad_row])
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert f"rows.jsonl row 1, field '{field}'" in str(info.value) and problem in str(info.value)


def test_source_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_preferences(tmp_path / "missing.jsonl")
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\nq,a,b\n")
    with pytest.raises(DataError, match="unsupported file type .csv"):
        load_preferences(csv)
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are test, train"):
        load_preferences(DPO_MIX, split="validation")
    with pytest.raises(DataError, match=r"adapter 'helpsteer2' needs the columns"):
        load_preferences(GENERIC / "explicit_text.jsonl", adapter="helpsteer2")
    with pytest.raises(DataError, match="reads preference data, not sft data"):
        load_sft(HELPSTEER2, adapter="helpsteer2")
    with pytest.raises(UnknownNameError, match="Did you mean 'helpsteer2'"):
        load_preferences(HELPSTEER2, adapter="helpstear2")


# --------------------------------------------------------------------------------------------
# Limits, ids, examples, rendering


def test_limit_stops_early():
    assert [len(load_preferences(DPO_MIX, limit=k)) for k in (0, 3)] == [0, 3]
    pairs = load_preferences(HELPSTEER2, limit=2, progress=True)
    assert (len(pairs), pairs.num_rows) == (2, 4)
    with pytest.raises(ValueError):
        load_preferences(DPO_MIX, limit=-1)


def test_repeated_ids_are_made_unique(tmp_path):
    rows = [{"id": "x", "prompt": "q", "chosen": f"a{i}", "rejected": "b"} for i in range(3)]
    result = load_preferences(write_jsonl(tmp_path / "dup.jsonl", rows))
    assert [ex.id for ex in result.examples] == ["x", "x#2", "x#3"]
    assert result.duplicate_ids == 2 and "repeated ids" in result.summary()


def test_examples_round_trip_and_are_frozen():
    ex = load_preferences(DPO_MIX, limit=1).examples[0]
    again = PreferenceExample.from_dict(json.loads(json.dumps(ex.to_dict())))
    assert again == ex
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.id = "other"
    sft = SFTExample("s", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], {"k": 1})
    assert SFTExample.from_dict(sft.to_dict()) == sft
    with pytest.raises(ValueError, match="missing: rejected"):
        PreferenceExample.from_dict({"id": "a", "prompt": [], "chosen": []})


def test_summary_and_rendering():
    result = load_preferences(DPO_MIX)
    assert isinstance(result, LoadResult)
    assert result.summary() == (
        f"{DPO_MIX} (split 'train', adapter 'dpo_mix_7k'): 20 rows -> 18 preference examples; "
        "skipped 2 (empty_response: 1, identical_pair: 1)"
    )
    text = render_example(result.examples[0], max_chars=10)
    assert "argilla/dpo-mix-7k/train/0" in text and "[assistant]" in text and "chars]" in text
    assert "prompt:" in text and "chosen:" in text and "rejected:" in text

    report = inspect_source(HELPSTEER2, "train", n=2)
    assert report.splitlines()[0].startswith(f"{HELPSTEER2} (split 'train', adapter 'helpsteer2')")
    assert "equal_helpfulness: 2" in report and "first 2 of 6 examples" in report
    assert report.count("── nvidia/HelpSteer2/train/") == 2
    sft_report = inspect_source(DEITA, "test", n=1, kind="sft")
    assert "adapter 'deita_sft'" in sft_report and "messages:" in sft_report
    assert "adapter 'deita_sft'" in inspect_source(DEITA, "test", n=0)  # kind from the adapter
