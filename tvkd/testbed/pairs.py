"""On-policy preference pairs with Bradley–Terry labels on the oracle.

docs/testbed.md §3: pairs made by corrupting the ideal answer "never made DPO beat SFT: the
corruptions are not what the SFT model gets wrong"; pairs sampled from the SFT model itself did.
So, per prompt: draw ``k`` samples from the policy at temperature 1, pair the best and the worst
by r* (when all ``k`` tie, a sample and a 1–3-edit corruption of itself, as the prototype did), and
label the pair by a Bradley–Terry draw on the oracle,

    P(y_a ≻ y_b) = σ((r*(x, y_a) − r*(x, y_b)) / T_label),

so some labels are wrong, like human labels. The label-noise rate is the fraction of pairs whose
chosen response has the lower oracle score.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..generation import generate
from . import tasks


def bradley_terry_label(score_a: float, score_b: float, temperature: float, rng: random.Random) -> bool:
    """Draw whether ``a`` is preferred to ``b`` with probability σ((r_a − r_b)/T)."""
    z = (score_a - score_b) / temperature
    p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return rng.random() < p


def answer_alphabet(problem: tasks.Problem, num_symbols: int, max_len: int) -> list[str]:
    """The words a wrong answer to this problem plausibly contains (counts for count, else symbols)."""
    return tasks.count_words(max_len) if problem.task == "count" else tasks.symbols(num_symbols)


def make_pair(
    problem: tasks.Problem,
    samples: Sequence[str],
    *,
    label_temperature: float,
    rng: random.Random,
    num_symbols: int,
    max_len: int,
) -> dict[str, Any]:
    """One labelled pair from a prompt's samples: best vs worst by r*, or a sample vs its corruption."""
    ideal = problem.ideal()
    words = [tasks.response_words(s) for s in samples]
    scores = [tasks.score_words(ideal, w) for w in words]
    hi = max(range(len(scores)), key=lambda i: (scores[i], -i))
    lo = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[hi] != scores[lo]:
        a, b, source = words[hi], words[lo], "on_policy"
    else:
        a, source = words[0], "corrupted"
        alphabet = answer_alphabet(problem, num_symbols, max_len)
        for _ in range(100):  # edits can cancel or keep r*; a tie-breaking draw almost always succeeds
            b = tasks.corrupt(a, rng, alphabet)
            if tasks.score_words(ideal, b) != scores[0]:
                break
        else:  # only reachable for degenerate one-word answers: pair against the ideal itself
            b = list(ideal)
    score_a, score_b = tasks.score_words(ideal, a), tasks.score_words(ideal, b)
    if not bradley_terry_label(score_a, score_b, label_temperature, rng):
        a, b, score_a, score_b = b, a, score_b, score_a
    return {
        "chosen": [{"role": "assistant", "content": " ".join(a)}],
        "rejected": [{"role": "assistant", "content": " ".join(b)}],
        "meta": {
            "task": problem.task,
            "ideal": " ".join(ideal),
            "oracle_chosen": score_a,
            "oracle_rejected": score_b,
            "label_flipped": score_a < score_b,
            "source": source,
            "sample_scores": scores,
        },
    }


def sample_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_rows: Sequence[dict[str, Any]],
    *,
    samples_per_prompt: int,
    temperature: float,
    label_temperature: float,
    max_new_tokens: int,
    seed: int,
    num_symbols: int,
    max_len: int,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Preference rows ``{id, prompt, chosen, rejected, meta}``, one per prompt row, in order."""
    samples = generate(
        model,
        tokenizer,
        [row["prompt"] for row in prompt_rows],
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        num_return_sequences=samples_per_prompt,
        seed=seed,
        progress=progress,
    )
    rng = random.Random(f"pairs-{seed}")
    rows = []
    for row, outs in zip(prompt_rows, samples, strict=True):
        problem = tasks.parse_prompt(row["prompt"][-1]["content"])
        pair = make_pair(
            problem,
            outs,
            label_temperature=label_temperature,
            rng=rng,
            num_symbols=num_symbols,
            max_len=max_len,
        )
        rows.append({"id": row["id"], "prompt": row["prompt"], **pair})
    return rows


def pair_stats(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Label noise, the share of corrupted (all-tie) pairs, and the mean oracle scores and lengths."""
    n = max(len(rows), 1)

    def mean(values: Any) -> float:
        values = list(values)
        return sum(values) / max(len(values), 1)

    return {
        "num_pairs": len(rows),
        "label_noise": sum(r["meta"]["label_flipped"] for r in rows) / n,
        "corrupted_fraction": sum(r["meta"]["source"] == "corrupted" for r in rows) / n,
        "oracle_chosen": mean(r["meta"]["oracle_chosen"] for r in rows),
        "oracle_rejected": mean(r["meta"]["oracle_rejected"] for r in rows),
        "mean_sample_oracle": mean(s for r in rows for s in r["meta"]["sample_scores"]),
        "chosen_len": mean(len(r["chosen"][0]["content"].split()) for r in rows),
        "rejected_len": mean(len(r["rejected"][0]["content"].split()) for r in rows),
    }
