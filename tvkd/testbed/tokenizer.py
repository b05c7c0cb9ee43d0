"""The testbed's word-level tokenizer and chat template.

One word per token (``tokenizers`` WordLevel + WhitespaceSplit) wrapped in
``transformers.PreTrainedTokenizerFast``, saved with ``save_pretrained`` so that
``AutoTokenizer.from_pretrained(folder)`` loads it like any hub tokenizer.

The chat template renders ``<bos> <user> {content} <eot> <assistant> {content} <eot> ...``.
Its contract is the one TRL's DPO preprocessing and docs/methods.md §A.1 rely on:
- an assistant turn's content tokens are followed by exactly the eos token ``<eot>``, the
  end-of-turn token ("EOS" in A.1), and nothing else closes the turn;
- ``apply_chat_template(prompt, add_generation_prompt=True)`` is a token prefix of
  ``apply_chat_template(prompt + [assistant message])``, so response ids are the suffix;
- the assistant content and its ``<eot>`` sit inside ``{% generation %}`` so that
  ``return_assistant_tokens_mask=True`` marks them (TRL's ``assistant_only_loss`` works).
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import tasks

PAD, BOS, EOT, UNK = "<pad>", "<bos>", "<eot>", "<unk>"
USER, ASSISTANT = "<user>", "<assistant>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOT, UNK, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "<user> {{ message['content'] }} <eot> "
    "{% elif message['role'] == 'assistant' %}"
    "<assistant> {% generation %}{{ message['content'] }} <eot>{% endgeneration %} "
    "{% else %}"
    "{{ raise_exception('the testbed chat template knows the roles user and assistant, not ' "
    "+ message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def vocabulary(num_symbols: int, max_len: int) -> list[str]:
    """Every word of the testbed, special tokens first (so ``<pad>`` is id 0)."""
    words = [*SPECIAL_TOKENS, *tasks.TASKS, tasks.SEPARATOR, *tasks.symbols(num_symbols)]
    return words + tasks.count_words(max_len)


def build_tokenizer(num_symbols: int, max_len: int) -> PreTrainedTokenizerFast:
    """The word-level tokenizer with the testbed's special tokens and chat template."""
    vocab = {word: i for i, word in enumerate(vocabulary(num_symbols, max_len))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder on purpose: `tokenizers` then joins the words with single spaces, the exact
    # inverse of WhitespaceSplit on normalised text.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOT,
        unk_token=UNK,
        extra_special_tokens=[USER, ASSISTANT],
        padding_side="right",  # A.1: training batches are right-padded; generation pads left itself
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
