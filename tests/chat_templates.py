"""Real chat templates (their Jinja strings in tests/fixtures/chat_templates) on a small byte-level BPE tokenizer.

The tokenizer is trained in memory on the rows' text (`tokenizers`' own BPE trainer, a byte-level
pre-tokeniser as Llama-3's, Qwen's and SmolLM's have), so newlines, spaces and the templates'
special tokens tokenize as they do on real models.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

# template -> (special tokens it writes, bos, eos: the tokenizer's eos_token as the model ships it)
SPECIALS = {
    "chatml": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
               "<|eot_id|>"),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>"),
}
# the end-of-turn token of each template (Gemma's tokenizer eos <eos> is not what closes a turn)
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>"}

CONVERSATIONS = [
    # (prompt messages, chosen, rejected); the second and fourth are multi-turn, the third has a system turn
    ([{"role": "user", "content": "Sort these words: pear, apple, fig."}],
     "apple, fig, pear", "pear, fig, apple"),
    ([{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
      {"role": "user", "content": "And times 3?"}],
     "2 + 2 = 4, and 4 times 3 is 12.", "It is 7."),
    ([{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
     "Blue.", "The sky is usually blue\nduring the day."),
    ([{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
      {"role": "user", "content": "Another one, please."}],
     "A pear.", "  Apple again!  "),
]


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def rows_for(name: str) -> list[tuple[list[dict], str, str]]:
    """The conversations the template accepts (Gemma and Mistral have no system role)."""
    if name in ("gemma", "mistral"):
        return [c for c in CONVERSATIONS if c[0][0]["role"] != "system"]
    return CONVERSATIONS


def bpe_tokenizer(name: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer with `name`'s special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos = SPECIALS[name]
    specials = ["<pad>", *specials]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [m["content"] for p, c, r in CONVERSATIONS for m in p] + [c for _, c, _ in CONVERSATIONS] \
        + [r for _, _, r in CONVERSATIONS] + [template(name)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token=bos, eos_token=eos,
                                  additional_special_tokens=[t for t in specials if t not in ("<pad>", bos, eos)],
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = template(name)
    return tok


def trl_dpo_preprocessing(rows: list[tuple[list[dict], str, str]], tokenizer, tmp_path) -> list[dict]:
    """TRL's own DPO preprocessing on (prompt messages, chosen text, rejected text) rows."""
    return trl_dpo_rows([(p, [{"role": "assistant", "content": c}], [{"role": "assistant", "content": r}])
                         for p, c, r in rows], tokenizer, tmp_path)


def trl_dpo_rows(rows: list[tuple[list[dict], list[dict], list[dict]]], tokenizer, tmp_path) -> list[dict]:
    """TRL's own DPO preprocessing (`DPOTrainer._prepare_dataset`, which reads only the tokenizer) on
    (prompt, chosen, rejected) message-list rows."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    data = datasets.Dataset.from_list([{"prompt": list(p), "chosen": list(c), "rejected": list(r)}
                                       for p, c, r in rows])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], max_length=None)

    class _Trainer:  # the one attribute _prepare_dataset reads besides its arguments
        _tokenizer = tokenizer

    out = DPOTrainer._prepare_dataset(_Trainer(), data, tokenizer, args, "train")
    return [{k: list(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in out]
