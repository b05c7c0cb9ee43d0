"""One tokenization: equality with TRL's DPO preprocessing, EOS convention, truncation, caching."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import datasets
import pytest

from tvkd.tokenize import TokenizeConfig, tokenize_preferences


def ex(i, prompt, chosen, rejected, text=False):
    if text:
        return SimpleNamespace(
            id=str(i), prompt=[{"role": "user", "content": prompt}], chosen=[{"role": "assistant", "content": chosen}],
            rejected=[{"role": "assistant", "content": rejected}], meta={"format": "text"},
        )
    return SimpleNamespace(
        id=str(i), prompt=[{"role": "user", "content": prompt}], chosen=[{"role": "assistant", "content": chosen}],
        rejected=[{"role": "assistant", "content": rejected}], meta={},
    )


ROWS = [
    ("sort c a b", "a b c", "c b a"),
    ("reverse a b", "b a", "a b"),
    ("hello world", "hello", "the cat the dog"),
    ("the cat", "yes", "no maybe"),
]


def trl_tokenized(rows, tokenizer, model, tmp_path, conversational=True):
    from trl import DPOConfig, DPOTrainer

    if conversational:
        data = [
            {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for p, c, r in rows
        ]
    else:
        data = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in rows]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], max_length=64,
                     per_device_train_batch_size=2)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=datasets.Dataset.from_list(data),
                         processing_class=tokenizer)
    return trainer.train_dataset


def test_conversational_ids_equal_trl(tiny_tokenizer, tiny_llama, tmp_path):
    ours = tokenize_preferences([ex(i, *r) for i, r in enumerate(ROWS)], tiny_tokenizer, TokenizeConfig(64, 32),
                                cache_dir=tmp_path / "tok", progress=False).dataset
    theirs = trl_tokenized(ROWS, tiny_tokenizer, tiny_llama, tmp_path)
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert [list(x) for x in ours[col]] == [list(x) for x in theirs[col]], col
    eot = tiny_tokenizer.convert_tokens_to_ids("<eot>")
    assert all(ids[-1] == eot for ids in list(ours["chosen_ids"]) + list(ours["rejected_ids"]))


def test_plain_text_ids_equal_trl(tiny_tokenizer, tiny_llama, tmp_path):
    rows = [(p, " " + c, " " + r) for p, c, r in ROWS]
    ours = tokenize_preferences([ex(i, *r, text=True) for i, r in enumerate(rows)], tiny_tokenizer,
                                TokenizeConfig(64, 32), cache_dir=tmp_path / "tok", progress=False)
    theirs = trl_tokenized(ROWS, tiny_tokenizer, tiny_llama, tmp_path, conversational=False)
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert [list(x) for x in ours.dataset[col]] == [list(x) for x in theirs[col]], col
    assert ours.counts.get("eos_appended", 0) == 0  # TRL appended the eos string: same ids


def test_template_tail_after_eos_is_kept_by_default_and_dropped_on_request(tiny_tokenizer, tmp_path):
    # A ChatML-like template renders text after the end-of-turn token: TRL keeps it (the default), end_at_eos cuts it.
    tiny_tokenizer.chat_template = tiny_tokenizer.chat_template.replace("' <eot> '", "' <eot> hello '")
    eot, hello = tiny_tokenizer.convert_tokens_to_ids(["<eot>", "hello"])
    kept = tokenize_preferences([ex(0, *ROWS[0])], tiny_tokenizer, TokenizeConfig(64, 32), cache_dir=tmp_path,
                                progress=False)
    assert kept.dataset["chosen_ids"][0][-2:] == [eot, hello]
    assert kept.counts["template_tail_kept"] == 2 and "template_tail_dropped" not in kept.counts
    out = tokenize_preferences([ex(0, *ROWS[0])], tiny_tokenizer, TokenizeConfig(64, 32, response_tail="end_at_eos"),
                               cache_dir=tmp_path, progress=False)
    assert out.dataset["chosen_ids"][0][-1] == eot
    assert out.counts["template_tail_dropped"] == 2


def test_truncation_counts_and_cache(tiny_tokenizer, tmp_path):
    rows = [ex(0, "hello " * 20, "a", "b"), ex(1, "sort a", "a " * 30, "b"), ex(2, *ROWS[0])]
    cfg = TokenizeConfig(max_length=24, max_prompt_length=16)
    first = tokenize_preferences(rows, tiny_tokenizer, cfg, cache_dir=tmp_path, progress=False)
    assert first.counts["skipped_long_prompt"] == 1
    assert first.counts["truncated_responses"] == 1
    assert first.counts["kept"] == 2
    assert all(len(p) + len(c) <= 24 for p, c in zip(first.dataset["prompt_ids"], first.dataset["chosen_ids"]))
    second = tokenize_preferences(rows, tiny_tokenizer, cfg, cache_dir=tmp_path, progress=False)
    assert second.cached and not first.cached and second.fingerprint == first.fingerprint
    dropped = tokenize_preferences(rows, tiny_tokenizer, TokenizeConfig(24, 16, truncation="drop"),
                                   cache_dir=tmp_path, progress=False)
    assert dropped.fingerprint != first.fingerprint and dropped.counts["skipped_truncated"] == 1


def test_bad_config_is_explained():
    with pytest.raises(ValueError, match="max_prompt_length"):
        TokenizeConfig(max_length=16, max_prompt_length=16)
    with pytest.raises(ValueError, match="truncation"):
        TokenizeConfig(truncation="middle")
