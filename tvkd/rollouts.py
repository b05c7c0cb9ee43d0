"""Greedy rollouts: responses written by a model, replacing one side of the training pairs.

SeqKD trains the student on the teacher's greedy answers to the training prompts (the chosen
side becomes the teacher's rollout); ADPA contrasts the data set's chosen answer with the
student's own greedy answer (the rejected side becomes the student's rollout). A rollout is
generated once per (tokenized data, model, length budget), cached like every other stage
(`tvkd.storage.cached_stage`), and reused by every run that asks for it. Each rollout ends with
the end-of-turn token (appended, and counted, when the budget ran out first), so it has the same
shape as a tokenized response and the teacher cache can read its states up to s_T.

Rollouts of a model loaded from a folder run through vLLM when it is installed and a GPU is
present (`tvkd.generation.generation_backend`), through batched ``model.generate`` otherwise.
Both give greedy continuations in the same format, but not always the same tokens (a different
kernel can break a near-tie of two logits the other way), so the cache is keyed by the backend:
a vLLM rollout never stands in for a ``generate`` one or the other way round. The ``generate``
key is the one rollouts had before vLLM existed here, so existing rollout caches (and every cache
and run keyed by them) stay valid.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tvkd.paths import cache_root, fingerprint
from tvkd.storage import cached_stage, save_dataset
from tvkd.tokenize import TokenizedData

ROLLOUT_VERSION = 1
SIDES = ("chosen", "rejected")


def rollout_key(tokenized_fingerprint: str, model_key: str, max_new_tokens: int, eos_id: int, backend: str) -> str:
    """The rollout cache's key: the data, the model, the budget, the end token and the backend ("hf": the
    key of before the backend was part of it)."""
    parts = [ROLLOUT_VERSION, "greedy", tokenized_fingerprint, model_key, max_new_tokens, eos_id]
    return fingerprint(*parts) if backend == "hf" else fingerprint(*parts, backend)


def greedy_rollouts(tokenized: TokenizedData, model: Any, *, side: str, eos_id: int, pad_id: int,
                    max_new_tokens: int, batch_size: int = 64, cache_dir: str | Path | None = None,
                    progress: bool = True, who: str = "model") -> TokenizedData:
    """A copy of `tokenized` whose `side` responses are `model`'s greedy continuations of the prompts.

    `model` is a `ModelSource` (loaded only if the rollouts are not cached). The result has its own
    fingerprint, so caches computed on it (reference, teacher) are keyed by the rollouts.
    """
    import datasets

    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    from tvkd.generation import generation_backend

    backend = generation_backend(getattr(model, "path", None))
    key = rollout_key(tokenized.fingerprint, model.key, max_new_tokens, eos_id, backend)
    path = (Path(cache_dir) if cache_dir else cache_root() / "rollouts") / key

    def build(tmp: Path) -> dict[str, Any]:
        from tvkd.generation import generate_ids, vllm_generate_ids

        prompts = [list(p) for p in tokenized.dataset["prompt_ids"]]
        unique = list(dict.fromkeys(tuple(p) for p in prompts))  # a prompt shared by pairs is generated once
        path = getattr(model, "path", None)
        if backend == "vllm":  # vLLM loads the folder itself: the transformers model is never loaded
            dtype = getattr(model, "dtype", None)
            outs = vllm_generate_ids(path, [list(p) for p in unique], eos_id=eos_id, max_new_tokens=max_new_tokens,
                                     dtype="auto" if dtype in (None, "auto") else dtype)
        else:
            outs = generate_ids(model.get(), [list(p) for p in unique], eos_id=eos_id, pad_id=pad_id,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                desc=f"{who} greedy rollouts", backend="hf")
        by_prompt, cut = {}, 0
        for p, (ids,) in zip(unique, outs):
            if not ids or ids[-1] != eos_id:
                ids, cut = ids + [eos_id], cut + 1
            by_prompt[p] = ids
        responses = [by_prompt[tuple(p)] for p in prompts]
        feats = datasets.Features({"response_ids": datasets.Sequence(datasets.Value("int32"))})
        save_dataset(datasets.Dataset.from_dict({"response_ids": responses}, features=feats), tmp / "data")
        lengths = [len(r) for r in responses]
        return {"prompts": len(unique), "pairs": len(responses), "hit_budget": cut,
                "mean_length": sum(lengths) / max(len(lengths), 1), "model": model.key, "backend": backend}

    stage = cached_stage(path, build, describe=f"{who} greedy rollouts")
    responses = datasets.load_from_disk(str(stage.path / "data"))["response_ids"]
    column = f"{side}_ids"
    ds = tokenized.dataset.remove_columns(column).add_column(column, responses,
                                                              feature=datasets.Sequence(datasets.Value("int32")))
    ds = ds.select_columns(tokenized.dataset.column_names)  # the original column order
    counts = {**tokenized.counts, f"{side}_rollouts_hit_budget": stage.record["hit_budget"]}
    return replace(tokenized, dataset=ds, fingerprint=fingerprint(tokenized.fingerprint, side, key),
                   counts=counts, cached=stage.cached)
