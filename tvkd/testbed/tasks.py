"""The testbed's world: symbolic list tasks, their ideal answers, and the oracle reward r*.

docs/testbed.md §1: prompts are small symbolic tasks of varied difficulty (sort / reverse /
dedupe / count a list of 3–10 symbols); the oracle r*(x, y) ∈ [0, 1] scores any response
(1 − normalised edit distance to the ideal answer).

A prompt is one line of whitespace-separated words, e.g. ``sort : c a b`` (answer ``a b c``),
``reverse : c a b`` (``b a c``), ``dedupe : c a c b`` (``c a b``: first occurrences in order) and
``count : c a c`` (``3``: the number of elements). The oracle reads the task from the prompt TEXT
alone, so anything that holds a prompt string (a JSONL row, a rendered chat, a generation log)
can be scored.

The "systematic flaw" lives here too: a fraction of the SFT demonstrations repeat their last
element before the end of the turn (``a b c c``). docs/testbed.md §3 records that preference
optimisation only helps when the SFT model has a systematic, greedy-visible error that on-policy
pairs can correct; this flaw is that error.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("sort", "reverse", "dedupe", "count")
"""Task names, in the order their words enter the vocabulary."""

SEPARATOR = ":"
"""Separates the instruction from the list in a prompt."""

EOS_TEXT = "<eot>"
"""The end-of-turn token's text; a response is cut at its first occurrence before scoring."""


def symbols(num_symbols: int) -> list[str]:
    """The list alphabet: ``a, b, c, ...`` (at most 26 letters, so no symbol is also a count)."""
    if not 2 <= num_symbols <= 26:
        raise ValueError(f"num_symbols must be in [2, 26], got {num_symbols}")
    return [chr(ord("a") + i) for i in range(num_symbols)]


def count_words(max_len: int) -> list[str]:
    """Answers of the count task: ``0 .. max_len``."""
    return [str(i) for i in range(max_len + 1)]


@dataclass(frozen=True)
class Problem:
    """One parsed prompt: the task and the list."""

    task: str
    items: tuple[str, ...]

    @property
    def text(self) -> str:
        """The prompt text a user message carries."""
        return f"{self.task} {SEPARATOR} {' '.join(self.items)}"

    def ideal(self) -> list[str]:
        """The ideal answer, as a list of words."""
        if self.task == "sort":
            return sorted(self.items)
        if self.task == "reverse":
            return list(reversed(self.items))
        if self.task == "dedupe":
            return list(dict.fromkeys(self.items))
        if self.task == "count":
            return [str(len(self.items))]
        raise ValueError(f"unknown task {self.task!r}; valid tasks: {', '.join(TASKS)}")


def sample_problem(rng: random.Random, *, num_symbols: int, min_len: int, max_len: int) -> Problem:
    """Draw one problem: a uniform task, a uniform length in [min_len, max_len], uniform symbols.

    Difficulty varies with the task (count is a one-word answer; reverse, dedupe and sort need
    every position right) and with the length.
    """
    alphabet = symbols(num_symbols)
    task = rng.choice(TASKS)
    n = rng.randint(min_len, max_len)
    return Problem(task=task, items=tuple(rng.choice(alphabet) for _ in range(n)))


def parse_prompt(prompt_text: str) -> Problem:
    """Parse a prompt back into a Problem.

    Accepts the bare user content (``sort : c a b``) or a rendered chat that contains it
    (``<bos> <user> sort : c a b <eot> <assistant>``): the last user turn is used.
    """
    text = prompt_text
    if "<user>" in text:
        text = text.rsplit("<user>", 1)[1]
    for stop in (EOS_TEXT, "<assistant>"):
        text = text.split(stop, 1)[0]
    words = text.split()
    if SEPARATOR not in words:
        raise ValueError(f"not a testbed prompt (no {SEPARATOR!r}): {prompt_text!r}")
    cut = words.index(SEPARATOR)
    head, items = words[:cut], tuple(words[cut + 1 :])
    if len(head) != 1 or head[0] not in TASKS:
        raise ValueError(f"unknown task in prompt {prompt_text!r}; valid tasks: {', '.join(TASKS)}")
    return Problem(task=head[0], items=items)


def response_words(response_text: str) -> list[str]:
    """The response as words, cut at the first end-of-turn token."""
    return response_text.split(EOS_TEXT, 1)[0].split()


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (unit insert/delete/substitute)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def score_words(ideal: Sequence[str], words: Sequence[str]) -> float:
    """r* on word lists: 1 − edit distance / max(|y|, |ideal|)."""
    denom = max(len(words), len(ideal), 1)
    return 1.0 - edit_distance(words, ideal) / denom


def score(prompt_text: str, response_text: str) -> float:
    """The oracle reward r*(x, y) ∈ [0, 1].

    r* = 1 − edit_distance(y cut at EOS, ideal(x)) / max(|y|, |ideal(x)|), over words. It is 1
    only for the ideal answer and 0 for an empty answer; the max-length normaliser makes an
    over-long answer (DPO's known length failure) cost as much as a wrong one.
    """
    return score_words(parse_prompt(prompt_text).ideal(), response_words(response_text))


def exact_match(prompt_text: str, response_text: str) -> bool:
    """Whether the response (cut at EOS) is exactly the ideal answer."""
    return response_words(response_text) == parse_prompt(prompt_text).ideal()


def add_flaw(words: Sequence[str]) -> list[str]:
    """The systematic flaw: repeat the last element before the end of the turn."""
    return [*words, words[-1]] if words else []


def has_flaw(prompt_text: str, response_text: str) -> bool:
    """Whether a response shows the flaw: it ends in a repeat whose removal raises r*.

    This counts ``a b c c`` for the ideal ``a b c`` (and any response whose spurious final repeat
    costs score), but not ``a b c c`` when the ideal itself ends in ``c c``.
    """
    ideal = parse_prompt(prompt_text).ideal()
    words = response_words(response_text)
    if len(words) < 2 or words[-1] != words[-2]:
        return False
    return score_words(ideal, words[:-1]) > score_words(ideal, words)


def corrupt(
    words: Sequence[str], rng: random.Random, alphabet: Sequence[str], max_edits: int = 3
) -> list[str]:
    """Apply 1..max_edits random word edits (substitute, insert, delete).

    Used only when the on-policy samples of a prompt all tie, to still form a pair (the prototype's
    recipe); edits can cancel, so the caller retries until the score differs.
    """
    out = list(words)
    for _ in range(rng.randint(1, max_edits)):
        op = rng.choice(("sub", "ins", "del") if len(out) > 1 else ("sub", "ins"))
        if op == "sub" and out:
            i = rng.randrange(len(out))
            out[i] = rng.choice([s for s in alphabet if s != out[i]])
        elif op == "ins" or not out:
            out.insert(rng.randrange(len(out) + 1), rng.choice(alphabet))
        else:
            del out[rng.randrange(len(out))]
    return out


def summarize(prompt_texts: Sequence[str], responses: Sequence[str]) -> dict[str, object]:
    """Oracle metrics of responses to prompts: mean r*, exact match, lengths, flaw rate, per task.

    ``longer_than_ideal`` is the fraction of responses with more words than the ideal answer,
    the symptom of DPO's length failure that docs/testbed.md §3 warns about.
    """
    if len(prompt_texts) != len(responses):
        raise ValueError(f"{len(prompt_texts)} prompts but {len(responses)} responses")
    n = max(len(responses), 1)
    problems = [parse_prompt(p) for p in prompt_texts]
    ideals = [p.ideal() for p in problems]
    words = [response_words(r) for r in responses]
    scores = [score_words(i, w) for i, w in zip(ideals, words)]
    per_task = {}
    for task in TASKS:
        idx = [k for k, p in enumerate(problems) if p.task == task]
        if idx:
            per_task[task] = sum(scores[k] for k in idx) / len(idx)
    return {
        "n": len(responses),
        "oracle": sum(scores) / n,
        "exact_match": sum(w == i for w, i in zip(words, ideals)) / n,
        "mean_len": sum(len(w) for w in words) / n,
        "mean_ideal_len": sum(len(i) for i in ideals) / n,
        "longer_than_ideal": sum(len(w) > len(i) for w, i in zip(words, ideals)) / n,
        "flaw_rate": sum(has_flaw(p, r) for p, r in zip(prompt_texts, responses)) / n,
        "oracle_by_task": per_task,
    }
