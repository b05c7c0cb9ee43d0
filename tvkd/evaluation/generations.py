"""Generations for benchmarks, saved in the run folder and keyed by the decoding settings.

`generations(model, tokenizer, prompts, decoding, run_dir, name)` returns one answer per prompt (a chat:
a list of messages), generating only what ``<run_dir>/generations/<name>-<key>.jsonl`` does not hold yet,
where ``key`` hashes the decoding settings (temperature, max_new_tokens, seed, sampling) and the model's
content key: a rerun with the same settings generates nothing, other settings get another file. Rows are
appended as batches finish, so an interrupted run keeps what it generated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tvkd.data.holdout import prompt_key
from tvkd.paths import fingerprint

DEFAULT_DECODING = {"do_sample": False, "temperature": 1.0, "max_new_tokens": 512, "seed": 0}


def decoding_key(decoding: dict[str, Any], model_key: str = "") -> str:
    d = {**DEFAULT_DECODING, **decoding}
    if not d["do_sample"]:
        d["temperature"] = 0.0  # greedy: the temperature is irrelevant
    return fingerprint("generation", 1, d, model_key, length=12)


def generations(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, Any]]], decoding: dict[str, Any],
                run_dir: str | Path, name: str, *, model_key: str = "", batch_size: int = 64,
                progress: bool = True) -> list[str]:
    """One answer per chat prompt, reusing and extending ``<run_dir>/generations/<name>-<key>.jsonl``."""
    from tvkd.generation import generate

    d = {**DEFAULT_DECODING, **decoding}
    path = Path(run_dir) / "generations" / f"{name}-{decoding_key(d, model_key)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a torn last line of a killed run: generate that prompt again
                    continue
                done[row["key"]] = row["answer"]
    keys = [prompt_key(list(p)) for p in prompts]
    todo = [i for i, k in enumerate(keys) if k not in done]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start: start + batch_size]
        answers = generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=d["max_new_tokens"],
                           do_sample=d["do_sample"], temperature=d["temperature"] if d["do_sample"] else 1.0,
                           seed=d["seed"], batch_size=batch_size, progress=progress)
        with open(path, "a", encoding="utf-8") as f:
            for i, (answer,) in zip(chunk, answers):
                done[keys[i]] = answer
                f.write(json.dumps({"key": keys[i], "answer": answer, "decoding": d}, ensure_ascii=False) + "\n")
            f.flush()
    return [done[k] for k in keys]
