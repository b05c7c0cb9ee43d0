"""One tokenization: preference examples -> prompt ids + response ids, saved as Arrow.

The convention (docs/methods.md §A.1) is TRL's DPO preprocessing, so our batches equal TRL's:
- conversational rows: prompt ids = chat template of the prompt with the generation prompt;
  each response = the suffix of the templated prompt+response after the common prefix;
- plain-text rows: the tokenizer's ``eos_token`` is appended to each completion, then the same
  prefix split.
By default (``response_tail: trl``) a response is exactly TRL's: whatever the template renders
after the end-of-turn token (ChatML's and Gemma's ``\n`` after ``<|im_end|>`` / ``<end_of_turn>``)
stays in it, so the claim "our batches equal TRL's" holds for any template; the terminal state
s_T whose teacher value TVKD reads is then the state after that tail (counted:
``template_tail_kept``). ``response_tail: end_at_eos`` keeps the older convention: each response
ends at its last end-of-turn token (the tokenizer's eos, or ``eos_token`` in the config), what
follows is dropped (``template_tail_dropped``), and a response without one gets one appended
(``eos_appended``). Under ``trl`` a conversational response without the end-of-turn token is
kept as TRL keeps it (``eos_missing``). Templates that render nothing after end-of-turn (the
testbed's, Llama-3's, Mistral's) give the same ids under both.

The result is keyed by a fingerprint of (examples, tokenizer files, template, lengths) and
saved under the cache, so a second call with the same inputs only loads it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tvkd.paths import cache_root, fingerprint
from tvkd.storage import cached_stage, save_dataset

log = logging.getLogger(__name__)

# Used when a tokenizer has no chat template (base models). Zephyr-style role headers; every
# turn ends in the eos token and nothing follows it, so the end-of-turn token is the last
# response token.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

RESPONSE_TAILS = ("trl", "end_at_eos")

TOKENIZATION_VERSION = 2  # bump when the output of this module changes for the same inputs


@dataclass
class TokenizeConfig:
    """How preference examples become token ids."""

    max_length: int = field(
        default=1024, metadata={"help": "Maximum prompt+response tokens; longer responses are cut (counted)."}
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompts with more tokens than this are skipped (counted)."}
    )
    truncation: str = field(
        default="keep_start",
        metadata={"help": "Over-long responses: 'keep_start' cuts the response end (as TRL), 'drop' skips the pair."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja chat template; default: the tokenizer's own, else DEFAULT_CHAT_TEMPLATE."},
    )
    eos_token: str | None = field(
        default=None, metadata={"help": "End-of-turn token ending each response; default: tokenizer.eos_token."}
    )

    response_tail: str = field(
        default="trl",
        metadata={"help": "trl: responses exactly as TRL's DPO preprocessing makes them (a template's text after "
                          "end-of-turn, e.g. ChatML's newline, kept); end_at_eos: cut each response after its last "
                          "end-of-turn token (appended if missing)."},
    )

    def __post_init__(self) -> None:
        if self.response_tail not in RESPONSE_TAILS:
            raise ValueError(f"response_tail must be one of {', '.join(RESPONSE_TAILS)}, got {self.response_tail!r}")
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.truncation not in ("keep_start", "drop"):
            raise ValueError(f"truncation must be 'keep_start' or 'drop', got {self.truncation!r}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}), "
                "or no response token would fit; set both (defaults 512 and 1024)"
            )


@dataclass
class TokenizedData:
    dataset: Any  # datasets.Dataset with columns id, prompt_ids, chosen_ids, rejected_ids, meta
    path: Path
    fingerprint: str
    counts: dict[str, int]
    cached: bool

    def summary(self) -> str:
        c = self.counts
        parts = [f"{c.get('kept', 0)} pairs tokenized"]
        for key in ("skipped_long_prompt", "skipped_truncated", "truncated_responses", "eos_appended",
                    "eos_missing", "template_tail_kept", "template_tail_dropped"):
            if c.get(key):
                parts.append(f"{key.replace('_', ' ')}: {c[key]}")
        return ", ".join(parts) + ("" if not self.cached else " (cached)")


def _features() -> Any:
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "prompt_ids": datasets.Sequence(datasets.Value("int32")),
            "chosen_ids": datasets.Sequence(datasets.Value("int32")),
            "rejected_ids": datasets.Sequence(datasets.Value("int32")),
            "meta": datasets.Value("string"),
        }
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what determines token ids: vocabulary, special tokens, normaliser/pre-tokeniser, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return fingerprint(
        spec,
        tokenizer.all_special_tokens,
        getattr(tokenizer, "chat_template", None),
        getattr(tokenizer, "add_bos_token", None),
    )


def ensure_chat_template(tokenizer: Any, template: str | None = None) -> str:
    """Set (and return) the chat template used; warns once when falling back to the default."""
    if template:
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template; using tvkd's DEFAULT_CHAT_TEMPLATE")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer.chat_template


def _template_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _end_at_eos(ids: list[int], eos_id: int, counts: Counter) -> list[int]:
    """Cut a response after its last end-of-turn token; append one if missing."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == eos_id:
            if i < len(ids) - 1:
                counts["template_tail_dropped"] += 1
            return ids[: i + 1]
    counts["eos_appended"] += 1
    return ids + [eos_id]


def _trl_tail(ids: list[int], eos_id: int, counts: Counter) -> list[int]:
    """TRL's response as it is; counts a tail after the last end-of-turn token, or its absence."""
    last = max((i for i, t in enumerate(ids) if t == eos_id), default=None)
    if last is None:
        counts["eos_missing"] += 1
    elif last < len(ids) - 1:
        counts["template_tail_kept"] += 1
    return ids


def tokenize_example(example: Any, tokenizer: Any, eos_id: int, counts: Counter,
                     response_tail: str = "trl") -> tuple[list, list, list]:
    """(prompt_ids, chosen_ids, rejected_ids) for one example, TRL's way (`response_tail`: see the module doc)."""
    is_text = (example.meta or {}).get("format") == "text"
    if is_text:
        prompt = example.prompt[-1]["content"]
        eos = tokenizer.convert_ids_to_tokens(eos_id)
        chosen = example.chosen[-1]["content"]
        rejected = example.rejected[-1]["content"]
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = tokenizer(prompt)["input_ids"]
        pc = tokenizer(prompt + chosen)["input_ids"]
        pr = tokenizer(prompt + rejected)["input_ids"]
    else:
        prompt_ids = _template_ids(tokenizer, list(example.prompt), add_generation_prompt=True)
        pc = _template_ids(tokenizer, list(example.prompt) + list(example.chosen), add_generation_prompt=False)
        pr = _template_ids(tokenizer, list(example.prompt) + list(example.rejected), add_generation_prompt=False)
    # As TRL: the response starts where prompt and prompt+response diverge.
    p = min(_common_prefix(prompt_ids, pc), _common_prefix(prompt_ids, pr))
    if p < len(prompt_ids):
        counts["prompt_not_prefix"] += 1
    end = _trl_tail if response_tail == "trl" else _end_at_eos
    return list(prompt_ids[:p]), end(list(pc[p:]), eos_id, counts), end(list(pr[p:]), eos_id, counts)


def examples_fingerprint(examples: Sequence[Any]) -> str:
    return fingerprint([[e.id, e.prompt, e.chosen, e.rejected, e.meta] for e in examples])


def tokenize_preferences(
    examples: Sequence[Any],
    tokenizer: Any,
    config: TokenizeConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> TokenizedData:
    """Tokenize preference examples once and save them as an Arrow dataset (reused when unchanged)."""
    import datasets

    config = config or TokenizeConfig()
    template = ensure_chat_template(tokenizer, config.chat_template)
    eos_token = config.eos_token or tokenizer.eos_token
    if eos_token is None:
        raise ValueError("the tokenizer has no eos_token; set TokenizeConfig.eos_token to its end-of-turn token")
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    if eos_id is None or eos_id == getattr(tokenizer, "unk_token_id", object()):
        raise ValueError(f"end-of-turn token {eos_token!r} is not in the tokenizer's vocabulary")

    key = fingerprint(
        TOKENIZATION_VERSION, examples_fingerprint(examples), tokenizer_fingerprint(tokenizer), template,
        asdict(config), eos_token,
    )
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenized"

    def build(tmp: Path) -> dict[str, Any]:
        counts, rows = _tokenize_rows(examples, tokenizer, config, eos_id, progress)
        if not counts["kept"]:  # raised before anything is saved: an empty stage is never cached
            raise NoPairFitsError(counts, config)
        save_dataset(datasets.Dataset.from_dict(rows, features=_features()), tmp / "data")
        return {"counts": counts, "config": asdict(config), "eos_token": eos_token}

    stage = cached_stage(root / key, build, describe="the tokenized data")
    if not stage.record["counts"].get("kept"):  # an empty stage cached by an older version
        raise NoPairFitsError(stage.record["counts"], config)
    ds = datasets.load_from_disk(str(stage.path / "data"))
    return TokenizedData(ds, stage.path, key, stage.record["counts"], cached=stage.cached)


class NoPairFitsError(ValueError):
    """Every pair was dropped by the length limits; the message says how many, why, and the fix."""

    def __init__(self, counts: dict[str, int], config: TokenizeConfig):
        why = []
        if counts.get("skipped_long_prompt"):
            why.append(f"{counts['skipped_long_prompt']} prompt(s) longer than tokenize.max_prompt_length "
                       f"({config.max_prompt_length} tokens)")
        if counts.get("skipped_truncated"):
            why.append(f"{counts['skipped_truncated']} pair(s) whose responses exceed tokenize.max_length "
                       f"({config.max_length} tokens) with tokenize.truncation: drop")
        super().__init__(f"no pair fits the tokenize limits: all {counts.get('input', 0)} dropped ("
                         f"{'; '.join(why) or 'no reason counted'}); raise tokenize.max_prompt_length / max_length"
                         + (" or set tokenize.truncation: keep_start" if counts.get("skipped_truncated") else ""))


def _tokenize_rows(examples: Sequence[Any], tokenizer: Any, config: TokenizeConfig, eos_id: int,
                   progress: bool) -> tuple[dict[str, int], dict[str, list]]:
    from tqdm.auto import tqdm

    counts: Counter = Counter()
    rows: dict[str, list] = {"id": [], "prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "meta": []}
    for ex in tqdm(examples, desc="tokenize", disable=not progress, unit="pair", leave=False):
        prompt_ids, chosen_ids, rejected_ids = tokenize_example(ex, tokenizer, eos_id, counts, config.response_tail)
        if len(prompt_ids) > config.max_prompt_length:
            counts["skipped_long_prompt"] += 1
            continue
        budget = config.max_length - len(prompt_ids)
        if len(chosen_ids) > budget or len(rejected_ids) > budget:
            if config.truncation == "drop":
                counts["skipped_truncated"] += 1
                continue
            counts["truncated_responses"] += int(len(chosen_ids) > budget) + int(len(rejected_ids) > budget)
            chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        rows["id"].append(str(ex.id))
        rows["prompt_ids"].append(prompt_ids)
        rows["chosen_ids"].append(chosen_ids)
        rows["rejected_ids"].append(rejected_ids)
        rows["meta"].append(json.dumps(ex.meta or {}, sort_keys=True, default=str))
    counts["kept"] = len(rows["id"])
    counts["input"] = len(examples)
    if counts["prompt_not_prefix"]:
        log.warning(
            "%d examples: the templated prompt is not a prefix of prompt+response; the response starts where "
            "they diverge (TRL's convention)", counts["prompt_not_prefix"],
        )
    return dict(counts), rows
