"""The length-bucketed order (`train.length_buckets`): seeded, a permutation, less padding; opt-in and
identity-neutral while off; the trainer takes it only when asked."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from torch.utils.data import RandomSampler

from tvkd.config import config_from_dict
from tvkd.training.sampler import LengthBucketSampler, padding_fraction, pair_lengths


def _lengths(n=2000, seed=0):
    # DPO-MIX-like: a long tail of lengths (log-normal, median ~300 tokens, clipped to 2,048)
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(300), 0.8, n), 16, 2048).astype(int).tolist()


def test_the_order_is_a_seeded_permutation_that_changes_per_epoch():
    lengths = _lengths()
    a = list(LengthBucketSampler(lengths, 8, seed=3))
    assert sorted(a) == list(range(len(lengths)))
    assert a == list(LengthBucketSampler(lengths, 8, seed=3))  # the same seed, the same order
    assert a != list(LengthBucketSampler(lengths, 8, seed=4))
    s = LengthBucketSampler(lengths, 8, seed=3)
    s.set_epoch(1)
    assert list(s) != a and sorted(s) == sorted(a)
    assert lengths[a[0]] == max(lengths)  # the longest pair first: out of memory shows at step 1


def test_batches_carry_far_less_padding_than_a_random_order():
    lengths = _lengths()
    bucketed = padding_fraction(lengths, list(LengthBucketSampler(lengths, 8, seed=0)), 8)
    random = padding_fraction(lengths, np.random.default_rng(0).permutation(len(lengths)).tolist(), 8)
    assert random > 0.35 and bucketed < 0.05, (random, bucketed)
    # by hand: two batches [10, 30] and [20, 20] -> 40 real tokens of 60 padded + 40
    assert padding_fraction([10, 30, 20, 20], [0, 1, 2, 3], 2) == pytest.approx(1 - 80 / 100)


def test_pair_lengths_are_prompt_plus_the_longer_response():
    ds = datasets.Dataset.from_dict({"prompt_ids": [[1, 2], [1]], "chosen_ids": [[3], [3, 4, 5]],
                                     "rejected_ids": [[4, 4, 4], [5]]})
    assert pair_lengths(ds) == [5, 4]


def test_opt_in_and_identity_neutral_while_off():
    assert "length_buckets" not in config_from_dict({}).to_dict()["train"]
    assert config_from_dict({"train": {"length_buckets": True}}).to_dict()["train"]["length_buckets"] is True


@pytest.mark.parametrize("on", [False, True])
def test_the_trainer_takes_the_bucketed_sampler_only_when_asked(tmp_path, on):
    from transformers import TrainingArguments

    from tests.conftest import make_tiny_llama
    from tvkd.losses import LOSSES, build_config
    from tvkd.training.trainer import PreferenceCollator, PreferenceTrainer

    lengths = _lengths(64)
    ds = datasets.Dataset.from_dict({"prompt_ids": [[1] * 4 for _ in lengths],
                                     "chosen_ids": [[2] * n for n in lengths], "rejected_ids": [[3] for _ in lengths]})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False,
                             per_device_train_batch_size=4, seed=0, data_seed=7)
    trainer = PreferenceTrainer(model=make_tiny_llama(16), args=args, train_dataset=ds,
                                data_collator=PreferenceCollator(0, {}, False), loss=LOSSES.get("dpo")(),
                                loss_config=build_config(LOSSES.get("dpo"), {}), length_buckets=on)
    sampler = trainer._get_train_sampler()
    if on:
        assert isinstance(sampler, LengthBucketSampler) and sampler.seed == 7 and sampler.batch_size == 4
        assert list(sampler) == list(LengthBucketSampler([n + 4 for n in lengths], 4, seed=7))
    else:
        assert isinstance(sampler, RandomSampler)


def test_padding_free_takes_flash_attention_varlen_only_where_it_exists(monkeypatch):
    import importlib.util

    import torch

    from tvkd.training.trainer import varlen_attention

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert varlen_attention(True, "cuda", torch.bfloat16)
    assert not varlen_attention(False, "cuda", torch.bfloat16)  # padded batches: sdpa as always
    assert not varlen_attention(True, "cpu", torch.bfloat16)
    assert not varlen_attention(True, "cuda", torch.float32)  # flash-attention runs 16-bit only
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert not varlen_attention(True, "cuda", torch.bfloat16)
