"""TRL's form of the response on real chat templates (ChatML, Llama-3, Gemma, Mistral), and the end_at_eos flag.

Our ids equal TRL's own DPO preprocessing (`DPOTrainer._prepare_dataset`) on every template, including the
text a template writes after the end-of-turn token (ChatML's and Gemma's newline); the counts say so.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from chat_templates import END_OF_TURN, SPECIALS, bpe_tokenizer, rows_for, trl_dpo_preprocessing

from tvkd.tokenize import TokenizeConfig, tokenize_preferences

pytest.importorskip("trl")

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def examples(rows):
    return [SimpleNamespace(id=f"row{i}", prompt=p, chosen=[{"role": "assistant", "content": c}],
                            rejected=[{"role": "assistant", "content": r}], meta={}) for i, (p, c, r) in enumerate(rows)]


def ours(rows, tok, tmp_path, **cfg):
    config = TokenizeConfig(max_length=512, max_prompt_length=256, **cfg)
    return tokenize_preferences(examples(rows), tok, config, cache_dir=tmp_path / "tok", progress=False)


@pytest.mark.parametrize("name", sorted(SPECIALS))
def test_default_tokenization_equals_trl(name, tmp_path):
    tok, rows = bpe_tokenizer(name), rows_for(name)
    theirs = trl_dpo_preprocessing(rows, tok, tmp_path)
    out = ours(rows, tok, tmp_path)
    for col in COLUMNS:
        assert [list(x) for x in out.dataset[col]] == [t[col] for t in theirs], (name, col)
    eot = tok.convert_tokens_to_ids(END_OF_TURN[name])
    responses = [list(x) for x in list(out.dataset["chosen_ids"]) + list(out.dataset["rejected_ids"])]
    # ChatML and Gemma write "\n" after the end-of-turn token: TRL keeps it, and so do we (counted)
    tail = name in ("chatml", "gemma")
    assert all((r[-2] if tail else r[-1]) == eot for r in responses), name
    if tail:
        assert {tok.decode(r[-1:]) for r in responses} == {"\n"}
    tails = out.counts.get("template_tail_kept", 0)
    # Gemma's tokenizer eos (<eos>) closes no turn: no response holds it, so none has a tail after it
    assert tails == (2 * len(rows) if name == "chatml" else 0)
    assert out.counts.get("eos_missing", 0) == (2 * len(rows) if name == "gemma" else 0)
    assert "template_tail_dropped" not in out.counts and "eos_appended" not in out.counts
    assert out.counts["kept"] == len(rows) and out.counts.get("prompt_not_prefix", 0) == 0


@pytest.mark.parametrize("name", sorted(SPECIALS))
def test_end_at_eos_keeps_the_older_form(name, tmp_path):
    tok, rows = bpe_tokenizer(name), rows_for(name)
    theirs = trl_dpo_preprocessing(rows, tok, tmp_path)
    out = ours(rows, tok, tmp_path, response_tail="end_at_eos", eos_token=END_OF_TURN[name])
    eot = tok.convert_tokens_to_ids(END_OF_TURN[name])
    for col in ("chosen_ids", "rejected_ids"):
        got, want = [list(x) for x in out.dataset[col]], [t[col] for t in theirs]
        assert all(g[-1] == eot for g in got)
        if name in ("chatml", "gemma"):
            assert got == [w[:-1] for w in want]  # TRL's minus the newline after end-of-turn
        else:
            assert got == want  # nothing after end-of-turn: both forms are TRL's
    assert out.counts.get("template_tail_dropped", 0) == (2 * len(rows) if name in ("chatml", "gemma") else 0)
    assert [list(x) for x in out.dataset["prompt_ids"]] == [t["prompt_ids"] for t in theirs]


def test_the_counts_are_in_the_summary(tmp_path):
    tok, rows = bpe_tokenizer("chatml"), rows_for("chatml")
    assert f"template tail kept: {2 * len(rows)}" in ours(rows, tok, tmp_path).summary()
    dropped = ours(rows, tok, tmp_path, response_tail="end_at_eos")
    assert f"template tail dropped: {2 * len(rows)}" in dropped.summary()


def test_response_tail_is_checked():
    with pytest.raises(ValueError, match="response_tail must be one of trl, end_at_eos"):
        TokenizeConfig(response_tail="cut")
