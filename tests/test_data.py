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


# --------------------------------------------------------------------------------------------
# Bad sources: every one is a one-line DataError naming the file (and line) and the fix


def raises_one_line(load, *args, **kwargs) -> DataError:
    """The DataError ``load`` raises, checked to be one line that ends with a fix."""
    with pytest.raises(DataError) as info:
        load(*args, **kwargs)
    err, message = info.value, str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert err.fix and message.rstrip().endswith((".", ")")) and err.fix in message
    return err


GOOD_ROW = {"prompt": "q", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("loader", [load_preferences, load_sft])
def test_folder_without_the_split_lists_its_splits(tmp_path, loader):
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [GOOD_ROW])  # no README: datasets names the split NamedSplit('train')
    err = raises_one_line(loader, folder, split="test")
    assert str(err).startswith(f"{folder}: has no split 'test'; its splits are train.")
    assert "split=" in err.fix and "--split" in err.fix


def test_malformed_jsonl_in_a_folder_names_the_file_and_line(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        json.dumps(GOOD_ROW) + "\n\n" + '{"prompt": "q", "chosen": "a",\n' + json.dumps(GOOD_ROW) + "\n"
    )
    err = raises_one_line(load_preferences, folder)
    assert str(err).startswith(f"{folder / 'train.jsonl'} line 3: not valid JSON")
    assert (err.source, err.line) == (str(folder / "train.jsonl"), 3)
    # datasets prepares every split of a folder, so a bad file of another split is named too.
    write_jsonl(folder / "train.jsonl", [GOOD_ROW])
    (folder / "test.jsonl").write_text(json.dumps(GOOD_ROW) + "\n[1, 2]\n")
    err = raises_one_line(load_preferences, folder, split="train")
    assert str(err).startswith(f"{folder / 'test.jsonl'} line 2: each line must be a JSON object, got list")


def test_file_of_blank_lines_has_no_rows(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n   \n")
    err = raises_one_line(load_preferences, path)
    assert str(err).startswith(f"{path}: the file has no rows")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n\n")
    assert str(raises_one_line(load_sft, folder)).startswith(
        f"{folder / 'train.jsonl'}: the file has no rows"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(raises_one_line(load_preferences, empty)).startswith(f"{empty}: holds no data files")


def test_a_folder_too_large_for_a_data_set_is_refused_before_datasets_walks_it(tmp_path, monkeypatch):
    """`datasets` looks for data files in the whole tree first (minutes on a home folder or /tmp)."""
    import tvkd.data.files as files

    big = tmp_path / "big"
    (big / "deep" / "er").mkdir(parents=True)
    (big / "train.jsonl").write_text(json.dumps(GOOD_ROW) + "\n")
    for i in range(6):
        (big / "deep" / "er" / f"note{i}.txt").write_text("x")
    monkeypatch.setattr(files, "MAX_FOLDER_FILES", 5)
    walked = []
    monkeypatch.setattr(files.datasets, "load_dataset_builder", lambda *a, **k: walked.append(a) or 1 / 0)
    err = raises_one_line(load_preferences, big)
    assert str(err).startswith(f"{big}: holds more than 5 files, too many for a data set folder") and not walked
    monkeypatch.undo()
    assert len(load_preferences(big)) == 1


def test_bad_utf8_names_the_file_and_line(tmp_path):
    good = json.dumps(GOOD_ROW).encode()
    bad = b'{"prompt": "q\xff\xfe", "chosen": "a", "rejected": "b"}'
    path = tmp_path / "latin.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n")
    err = raises_one_line(load_preferences, path)
    assert str(err).startswith(f"{path} line 2: not valid UTF-8 (byte 0xff at byte 14 of the line)")
    assert err.line == 2 and "must be UTF-8" in err.fix
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    assert str(raises_one_line(load_preferences, folder)).startswith(
        f"{folder / 'train.jsonl'} line 2: not valid UTF-8"
    )
    document = tmp_path / "latin.json"
    document.write_bytes(b"[\n" + good + b",\n" + bad + b"\n]\n")
    assert str(raises_one_line(load_preferences, document)).startswith(f"{document} line 3: not valid UTF-8")


@pytest.mark.parametrize(
    "hub_id, loader, split",
    [
        ("argilla/dpo-mix-7k", load_preferences, "train"),
        ("nvidia/HelpSteer2", load_preferences, "test"),
        ("HuggingFaceH4/deita-10k-v0-sft", load_sft, "train"),
        ("tvkd-tests/no-such-dataset", load_preferences, "train"),
    ],
)
def test_hub_id_not_cached_while_offline(monkeypatch, tmp_path, hub_id, loader, split):
    # An empty datasets cache, and offline: datasets cannot find the data set anywhere.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    err = raises_one_line(loader, hub_id, split=split)
    assert str(err).startswith(f"{hub_id}: this data set is not in the local Hugging Face cache")
    assert "offline" in err.problem and "HF_HUB_OFFLINE=1" in err.problem
    assert f"huggingface-cli download --repo-type dataset {hub_id}" in err.fix
    assert "point source at a local folder or file" in err.fix


@pytest.mark.parametrize(
    "raised, problem",
    [
        (
            ConnectionError("Couldn't reach 'x' on the Hub (ConnectError)"),
            "could not reach the Hugging Face Hub",
        ),
        (
            datasets.exceptions.DatasetNotFoundError("Dataset 'x' doesn't exist"),
            "no such data set on the Hugging Face Hub",
        ),
        (ValueError("Unknown split \"dev\". Should be one of ['train', 'test']."), "has no split 'dev'"),
    ],
)
def test_other_hub_failures(monkeypatch, raised, problem):
    import huggingface_hub.constants

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(datasets, "load_dataset", fail)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    err = raises_one_line(load_preferences, "someone/pairs", split="dev")
    assert str(err).startswith("someone/pairs") and problem in err.problem


def test_kind_mismatch_suggests_the_other_kind(tmp_path):
    err = raises_one_line(load_preferences, GENERIC / "sft_messages.jsonl")
    assert "no preference adapter fits the columns id, messages" in err.problem
    assert 'kind="sft"' in err.fix and "--kind sft" in err.fix and "load_sft" in err.fix
    err = raises_one_line(load_preferences, DEITA, split="train_sft")
    assert "--kind sft" in err.fix
    err = raises_one_line(load_sft, GENERIC / "explicit_text.jsonl")
    assert 'kind="preference"' in err.fix and "--kind preference" in err.fix
    err = raises_one_line(load_sft, HELPSTEER2, adapter="helpsteer2")
    assert "--kind preference" in err.fix
    # Columns that fit neither kind keep the plain fix.
    err = raises_one_line(load_sft, write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}]))
    assert err.fix == "Rename the columns, or pass adapter=<name>."


def test_truncated_parquet_names_the_file(tmp_path):
    shard = DPO_MIX / "data" / "test-00000-of-00001.parquet"
    path = tmp_path / "pairs.parquet"
    path.write_bytes(shard.read_bytes()[:300])
    err = raises_one_line(load_preferences, path)
    assert str(err).startswith(f"{path}: not a readable Parquet file")
    folder = tmp_path / "argilla" / "dpo-mix-7k"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train-00000-of-00001.parquet").write_bytes(shard.read_bytes()[:-20])
    err = raises_one_line(load_preferences, folder)
    assert str(err).startswith(
        f"{folder / 'data' / 'train-00000-of-00001.parquet'}: not a readable Parquet file"
    )


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes((HELPSTEER2 / "train.jsonl.gz").read_bytes()[:60])
    assert str(raises_one_line(load_preferences, path)).startswith(f"{path}: not a readable gzip file")


@pytest.mark.parametrize(
    "text, problem, row, line",
    [
        ("3", "the top level is int 3, not a list of row objects", None, None),
        ('"rows"', "the top level is str 'rows'", None, None),
        (
            '{"rows": [{"prompt": "q", "chosen": "a", "rejected": "b"}]}',
            "'rows' holds a list of 1 objects",
            None,
            None,
        ),
        ('[{"prompt": "q", "chosen": "a", "rejected": "b"}, "x"]', "item 1 is str 'x'", 1, None),
        (
            '{\n  "prompt": "q",\n  "chosen": "a",\n  "rejected": "b"\n}',
            "one JSON object spread over 5 lines",
            None,
            None,
        ),
        ("[]", "the file has no rows", None, None),
        (
            '[\n  {"prompt": "q", "chosen": "a", "rejected": "b"},\n  {"prompt": "q",, }\n]',
            "not valid JSON",
            None,
            3,
        ),
    ],
)
def test_json_file_must_hold_a_list_of_rows(tmp_path, text, problem, row, line):
    path = tmp_path / "pairs.json"
    path.write_text(text)
    err = raises_one_line(load_preferences, path)
    assert str(err).startswith(str(path)) and problem in err.problem
    assert err.rows == (() if row is None else (row,)) and err.line == line


def test_json_file_that_is_json_lines_is_read_as_lines(tmp_path):
    path = tmp_path / "pairs.json"
    write_jsonl(path, [GOOD_ROW, {**GOOD_ROW, "chosen": "c"}])
    assert len(load_preferences(path)) == 2
    path.write_text(json.dumps(GOOD_ROW) + "\n" + '{"prompt": "q"\n')
    assert str(raises_one_line(load_preferences, path)).startswith(f"{path} line 2: not valid JSON")
    one_row = tmp_path / "one.json"
    one_row.write_text(
        json.dumps(
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
            }
        )
    )
    assert len(load_preferences(one_row)) == 1  # one object on one line: a one-row file, not a wrapper


def test_bad_file_logs_nothing_besides_the_error(tmp_path, caplog):
    # datasets logs "Failed to load JSON from file ..." before raising; the DataError says it all.
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(GOOD_ROW) + '\n{"prompt": "q",, }\n')
    with caplog.at_level("WARNING"):
        raises_one_line(load_preferences, folder)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("datasets")] == []


def test_load_failure_no_check_explains(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_ROW])

    def fail_with(cause):
        def load_dataset(*args, **kwargs):
            try:
                raise cause
            except Exception as e:
                raise datasets.exceptions.DatasetGenerationError("An error occurred") from e

        return load_dataset

    # About the data: a DataError quoting Arrow's reason.
    monkeypatch.setattr(datasets, "load_dataset", fail_with(TypeError("Couldn't cast array of type int64")))
    err = raises_one_line(load_preferences, path)
    assert str(err).startswith(f"{path}: could not be read into a table (TypeError: Couldn't cast array")
    # About the machine (disk, cache): the original error, untouched.
    monkeypatch.setattr(datasets, "load_dataset", fail_with(OSError(28, "No space left on device")))
    with pytest.raises(datasets.exceptions.DatasetGenerationError):
        load_preferences(path)


def test_adapters_are_found_by_discovery_one_file_per_schema():
    """A new schema is one file in tvkd/data/adapters/ (or an entry point in ``tvkd.data_adapters``)."""
    import importlib
    import pkgutil

    import tvkd.data.adapters as package

    modules = [m.name for m in pkgutil.iter_modules(package.__path__)]
    assert set(modules) >= {"generic", "dpo_mix_7k", "helpsteer2", "deita"}
    where = {ADAPTERS.where(name).rsplit(".", 1)[0] for name in ADAPTERS.names()}
    assert where == {f"tvkd.data.adapters.{m}" for m in modules}  # each file registers what it holds
    assert ADAPTERS.discovery.packages == ("tvkd.data.adapters",)
    assert ADAPTERS.discovery.entry_points == "tvkd.data_adapters"
    assert importlib.import_module("tvkd.data.adapters.dpo_mix_7k").dpo_mix_7k is ADAPTERS.get("dpo_mix_7k")
