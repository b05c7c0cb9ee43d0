"""Shared fixtures: a tiny word-level tokenizer and tiny Llama models built in memory (no downloads)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

WORDS = ["hello", "world", "sort", "reverse", "a", "b", "c", "d", "e", "yes", "no", "maybe", "the", "cat", "dog"]
TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' <eot> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def make_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eot>", "<user>", "<assistant>", "<system>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eot>",
        additional_special_tokens=["<user>", "<assistant>", "<system>"],
    )
    fast.chat_template = TINY_TEMPLATE
    return fast


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


PAIRS = [
    ("sort c a b", "a b c", "c b a"), ("reverse a b", "b a", "a b"), ("sort b a", "a b", "b a"),
    ("hello world", "hello", "the cat the dog"), ("the cat", "yes", "no maybe"), ("sort e d", "d e", "e d e"),
]


@pytest.fixture
def tiny_world(tmp_path, monkeypatch):
    """A teacher, a student and a JSONL of pairs on disk, like a hub download would leave them."""
    monkeypatch.setenv("TVKD_CACHE", str(tmp_path / "cache"))
    tok = make_tiny_tokenizer()
    paths = {}
    for name, layers, hidden, seed in (("teacher", 2, 32, 1), ("student", 1, 16, 2)):
        model = make_tiny_llama(len(tok), seed=seed, layers=layers, hidden=hidden)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    rows = [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}], "meta": {"oracle_chosen": 1.0, "oracle_rejected": 0.0}}
        for i, (p, c, r) in enumerate(PAIRS * 4)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    paths["data"] = str(data)
    return paths


