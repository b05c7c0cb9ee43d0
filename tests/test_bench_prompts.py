"""`tvkd eval` benchmarks answer whole prompts: system message and earlier turns rebuilt from the run's test data."""

from __future__ import annotations

import json
from pathlib import Path

from tvkd.benchmarks._run import _test_prompts
from tvkd.config import config_from_dict
from tvkd.data import load_preferences

DPO_MIX = Path(__file__).parent / "fixtures" / "argilla" / "dpo-mix-7k"


def _run(tmp_path, prompts):
    run = tmp_path / "run"
    run.mkdir()
    (run / "outputs.jsonl").write_text("".join(json.dumps({"prompt": p, "response": "x"}) + "\n" for p in prompts))
    return run


def _cfg(source=DPO_MIX):
    return config_from_dict({"data": {"source": str(source), "test_source": str(source), "test_split": "test"}})


def test_multi_turn_prompts_keep_their_system_message_and_earlier_turns(tmp_path):
    chats = [ex.prompt for ex in load_preferences(DPO_MIX, split="test").examples]
    assert [m["role"] for m in chats[0]] == ["user", "assistant", "user"]  # the fixture's multi-turn row
    assert chats[1][0]["role"] == "system"
    run = _run(tmp_path, [c[-1]["content"] for c in chats])
    said = []
    got = _test_prompts(run, _cfg(), say=said.append)
    assert got == chats and said == []
    assert _test_prompts(run) == [[{"role": "user", "content": c[-1]["content"]}] for c in chats]  # no config


def test_prompts_that_no_longer_match_the_data_fall_back_and_say_so(tmp_path):
    run = _run(tmp_path, ["a prompt the data does not hold"])
    said = []
    got = _test_prompts(run, _cfg(), say=said.append)
    assert got == [[{"role": "user", "content": "a prompt the data does not hold"}]]
    assert len(said) == 1 and "no longer gives the prompts" in said[0]
    said.clear()
    assert _test_prompts(run, _cfg(tmp_path / "gone.jsonl"), say=said.append) == got
    assert len(said) == 1 and "could not be reloaded" in said[0]
