"""A testbed teacher with another vocabulary and its own chat template: the same network, other token ids.

`other_vocabulary(model_dir, out_dir)` saves a copy of a word-level model folder (the testbed's, or any
``WordLevel`` + ``WhitespaceSplit`` tokenizer with a Llama-style model) whose tokenizer

- renames every special token (``<eot>`` -> ``<|eot|>``, ...), so its template writes other strings,
- numbers every token differently (a seeded permutation of the ids), so no id means what it meant,

and whose embedding and output rows are permuted the same way. The network computes exactly the
same function of the *text*: every word and every turn marker of a rendered conversation maps to the
row it had before. So a teacher-side value of a text (a log-prob, a soft value after a response) is
the original teacher's to float precision, while the student's ids mean nothing to it: the testbed's
check of teachers with another tokenizer (`tvkd.cross_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tvkd.testbed.tokenizer import CHAT_TEMPLATE


def renamed(token: str) -> str:
    """``<eot>`` -> ``<|eot|>``: the other tokenizer's name of a special token."""
    return f"<|{token[1:-1]}|>" if token.startswith("<") and token.endswith(">") else token


def renamed_template(template: str, specials: list[str]) -> str:
    """The template with every special token's literal renamed (the testbed's writes them literally)."""
    for token in sorted(specials, key=len, reverse=True):
        template = template.replace(token, renamed(token))
    return template


def other_vocabulary(model_dir: str | Path, out_dir: str | Path, *, seed: int = 0,
                     template: str | None = None) -> Path:
    """Save the model of `model_dir` behind a tokenizer of renamed special tokens and permuted ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    vocab = tok.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise ValueError(f"{model_dir}: token ids are not 0..{n - 1}")
    specials = list(dict.fromkeys(tok.all_special_tokens))
    new_id = np.random.default_rng(seed).permutation(n)  # new_id[old id]
    new_vocab = {renamed(t) if t in specials else t: int(new_id[i]) for t, i in vocab.items()}
    backend = Tokenizer(models.WordLevel(vocab=new_vocab, unk_token=renamed(tok.unk_token)))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    named = {k: renamed(getattr(tok, k)) for k in ("pad_token", "bos_token", "eos_token", "unk_token")
             if getattr(tok, k) is not None}
    other = PreTrainedTokenizerFast(
        tokenizer_object=backend, **named,
        extra_special_tokens=[renamed(t) for t in specials if t not in {getattr(tok, k) for k in named}],
        padding_side=tok.padding_side, model_max_length=tok.model_max_length, clean_up_tokenization_spaces=False)
    other.chat_template = template or renamed_template(tok.chat_template or CHAT_TEMPLATE, specials)

    old_of_new = torch.as_tensor(np.argsort(new_id))  # old id of each new id
    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight.copy_(emb.weight[old_of_new].clone())
        head = model.get_output_embeddings()
        if head.weight.data_ptr() != emb.weight.data_ptr():
            head.weight.copy_(head.weight[old_of_new].clone())
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        for config in (model.config, model.generation_config):
            old = getattr(config, key, None)
            if isinstance(old, int):
                setattr(config, key, int(new_id[old]))
    out = Path(out_dir)
    model.save_pretrained(out)
    other.save_pretrained(out)
    return out
