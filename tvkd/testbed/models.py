"""The testbed's teacher and student: tiny ``LlamaForCausalLM`` models sharing one vocabulary.

docs/testbed.md §1: a teacher (a larger tiny Llama) and a student (a smaller one) sharing one
word-level tokenizer. The sizes are the early prototype's (docs/testbed.md §2): the teacher (~0.67M parameters)
reaches r* ≈ 0.84 after SFT, the student (~0.09M) ≈ 0.6–0.65, a clear capacity gap that
distillation can try to close.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelSize:
    """The shape of a tiny Llama."""

    num_hidden_layers: int = field(metadata={"help": "Transformer blocks."})
    hidden_size: int = field(metadata={"help": "Residual width."})
    num_attention_heads: int = field(metadata={"help": "Attention heads (also the key/value heads)."})
    intermediate_size: int = field(metadata={"help": "MLP width."})


TEACHER = ModelSize(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=256)
STUDENT = ModelSize(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)


def llama_config(
    size: ModelSize, tokenizer: PreTrainedTokenizerBase, max_positions: int = 128
) -> LlamaConfig:
    """A LlamaConfig of the given size whose vocabulary and special ids are the tokenizer's."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        use_cache=True,
    )


def init_model(size: ModelSize, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 model; the same seed gives bit-identical weights."""
    config = llama_config(size, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
