"""Batched generation from chat prompts for any Hugging Face causal LM with a chat template.

Used to sample on-policy preference pairs (testbed) and for greedy evaluation. Prompts are
rendered with the tokenizer's chat template (``add_generation_prompt=True``), grouped by length
to keep padding small, left-padded, and passed to ``model.generate``; each completion is cut at
its first end-of-turn token (the tokenizer's eos) and decoded without special tokens.

Fast path: when the model is a folder on disk (``model_path``), `vllm` is importable and a CUDA
GPU is present, `generate_ids` runs vLLM instead (`vllm.LLM` + `SamplingParams`, paged attention
and continuous batching), with the same output format: per prompt, ``num_return_sequences`` id
lists cut after the first end-of-turn token, which is kept. Greedy outputs agree with
``model.generate`` up to floating-point ties; sampled ones follow vLLM's own random stream.
``TVKD_GENERATION=hf`` forces ``model.generate``, ``TVKD_GENERATION=vllm`` requires vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def render_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a chat prompt ending in the generation prompt (the assistant header)."""
    return list(
        tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[dict[str, Any]]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    model_path: Any = None,
) -> list[list[str]]:
    """Generate completions for chat prompts.

    Returns one list per prompt, in the order of ``prompts``, holding ``num_return_sequences``
    decoded completions (the text before the first eos token, special tokens removed; a
    completion that never emits eos is the text of its ``max_new_tokens`` tokens).

    Sampling (``do_sample=True``) is pure temperature sampling (no top-k/top-p) and
    deterministic for a fixed ``seed`` and ``batch_size``; the global torch RNG is left
    untouched. ``batch_size`` counts prompts, so one forward holds up to
    ``batch_size * num_return_sequences`` sequences. ``model_path``: the folder holding `model`'s
    weights, which lets vLLM generate instead (`generation_backend`).
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; generation could not tell where a turn ends")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    ids = generate_ids(model, [render_prompt_ids(tokenizer, p) for p in prompts], eos_id=eos_id, pad_id=pad_id,
                       max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                       num_return_sequences=num_return_sequences, seed=seed, batch_size=batch_size,
                       progress=progress, model_path=model_path)
    return [[tokenizer.decode(c[:-1] if c and c[-1] == eos_id else c, skip_special_tokens=True) for c in per]
            for per in ids]


BACKENDS = ("auto", "hf", "vllm")


def generation_backend(model_path: Any = None, requested: str | None = None) -> str:
    """"vllm" or "hf": `requested` (default ``$TVKD_GENERATION`` or "auto"), where auto means vLLM when
    it is importable, a CUDA GPU is present and the model is a folder it can load (``model_path``)."""
    import importlib.util
    import os

    requested = requested or os.environ.get("TVKD_GENERATION", "auto")
    if requested not in BACKENDS:
        raise ValueError(f"TVKD_GENERATION must be one of {', '.join(BACKENDS)}, got {requested!r}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    ready = has_vllm and torch.cuda.is_available() and model_path is not None
    if requested == "vllm" and not ready:
        why = ("vllm is not installed (pip install vllm)" if not has_vllm else
               "no CUDA GPU is present" if not torch.cuda.is_available() else
               "the model is in memory, not a folder vLLM can load")
        raise ValueError(f"TVKD_GENERATION=vllm but {why}; unset it to generate with transformers")
    return "vllm" if requested == "vllm" or (requested == "auto" and ready) else "hf"


def vllm_generate_ids(
    model_path: Any, prompt_ids: Sequence[Sequence[int]], *, eos_id: int, max_new_tokens: int,
    do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1, seed: int = 0,
    dtype: str = "auto", llm: Any = None,
) -> list[list[list[int]]]:
    """`generate_ids` through vLLM: the same sampling settings and the same output format."""
    from vllm import LLM, SamplingParams

    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy decoding repeats itself)")
    if llm is None:
        llm = LLM(model=str(model_path), dtype=dtype, seed=seed, trust_remote_code=False)
    params = SamplingParams(
        n=num_return_sequences, temperature=temperature if do_sample else 0.0, top_p=1.0, top_k=-1,
        max_tokens=max_new_tokens, seed=seed if do_sample else None,
        # stop at this end-of-turn id only, as `model.generate(eos_token_id=eos_id)` does
        ignore_eos=True, stop_token_ids=[eos_id], detokenize=False,
    )
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
    results: list[list[list[int]]] = []
    for out in outs:
        per: list[list[int]] = []
        for c in out.outputs:
            ids = list(c.token_ids)
            if eos_id in ids:
                ids = ids[: ids.index(eos_id) + 1]
            elif c.finish_reason == "stop":  # vLLM leaves a special stop token out of token_ids
                ids.append(eos_id)
            per.append(ids)
        results.append(per)
    return results


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "generate",
    model_path: Any = None,
    backend: str | None = None,
) -> list[list[list[int]]]:
    """Completions as token ids for prompts given as token ids: one list per prompt of
    ``num_return_sequences`` id lists, each cut after its first eos (eos kept; a completion that
    never emits eos holds its ``max_new_tokens`` ids and no eos). Batching, padding and seeding
    as in `generate`. ``model_path``: the folder `model` was loaded from, which lets vLLM generate
    instead (`generation_backend`; ``backend`` "hf" forces transformers)."""
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy decoding repeats itself)")
    if generation_backend(model_path, backend) == "vllm":
        dtype = str(next(model.parameters()).dtype).replace("torch.", "") if model is not None else "auto"
        return vllm_generate_ids(model_path, prompt_ids, eos_id=eos_id, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=temperature,
                                 num_return_sequences=num_return_sequences, seed=seed, dtype=dtype)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = [list(p) for p in prompt_ids]
    # Equal-length prompts share a batch, so left padding (and wasted compute) is minimal.
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    results: list[list[list[int]]] = [[] for _ in encoded]
    # Explicit values override whatever top-k/top-p a model's saved generation config carries.
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if do_sample
        else {"do_sample": False}
    )
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
                **sampling,
            )
            for k, ids in enumerate(out[:, width:].tolist()):
                if eos_id in ids:
                    ids = ids[: ids.index(eos_id) + 1]
                results[batch[k // num_return_sequences]].append(ids)
    model.train(was_training)
    return results
