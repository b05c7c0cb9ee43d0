"""Batching pairs and reading a causal LM's logits at response states (docs/methods.md §A.1).

Input ids = prompt ids + response ids (ending in EOS), right padded; chosen rows first, then
rejected. The logits at index i predict token i+1, so with prompt length p the state s_t
(t = 0..T) has its logits at index p+t−1, and s_T (after EOS) at the EOS position p+T−1.

Only the positions from the shortest prompt's end onwards go through the LM head
(`logits_to_keep`), so prompt positions cost no [L, V] matmul; the wanted states are then
gathered per row into a response-aligned [rows, T(+1), V] tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def collate_pairs(features: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """[prompt+chosen for B rows] + [prompt+rejected for B rows], right padded.

    Returns input_ids/attention_mask [2B, L], prompt_lens/resp_lens [2B], response_ids and
    mask [2B, T] (response-aligned).
    """
    prompts = [list(f["prompt_ids"]) for f in features]
    responses = [list(f["chosen_ids"]) for f in features] + [list(f["rejected_ids"]) for f in features]
    prompts = prompts + prompts
    seqs = [p + r for p, r in zip(prompts, responses)]
    n, L = len(seqs), max(len(s) for s in seqs)
    T = max(len(r) for r in responses)
    input_ids = torch.full((n, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, L), dtype=torch.long)
    response_ids = torch.full((n, T), pad_id, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.bool)
    for i, (s, r) in enumerate(zip(seqs, responses)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        response_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_lens": torch.tensor([len(p) for p in prompts]),
        "resp_lens": torch.tensor([len(r) for r in responses]),
        "response_ids": response_ids,
        "response_mask": mask,
    }


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (checked on the signature, not by catching
    a TypeError, which would hide real errors inside the forward and run it twice)."""
    import inspect

    fwd = getattr(model, "forward", None)
    if fwd is None:
        return False
    params = inspect.signature(fwd).parameters
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def state_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor,
    resp_lens: torch.Tensor, *, terminal: bool = False,
) -> torch.Tensor:
    """Response-aligned logits [rows, T, V] at states s_0..s_{T−1} (or [rows, T+1, V] with s_T).

    Padded states hold the logits of some real position (gathered with a clamped index); callers
    mask them.
    """
    rows, L = input_ids.shape
    n_states = int(resp_lens.max()) + (1 if terminal else 0)
    first = int(prompt_lens.min()) - 1  # earliest state position over the rows
    if first < 0:
        raise ValueError("a row has an empty prompt: state s_0 needs at least one prompt token (e.g. BOS)")
    keep = L - first
    extra = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    logits = out.logits
    offset = L - logits.shape[1]
    t = torch.arange(n_states, device=input_ids.device)
    pos = prompt_lens.to(input_ids.device)[:, None] - 1 + t[None, :] - offset
    # A state past a row's end is padding: point it at the row's last real position.
    last = (prompt_lens + resp_lens).to(input_ids.device)[:, None] - 1 - offset
    pos = torch.minimum(pos, last).clamp_min(0)
    return logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))


def token_logps(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(a_t|s_t) in fp32 from response-aligned logits [rows, T, V]; 0 where ~mask."""
    z = logits.float()
    logp = z.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return logp.masked_fill(~mask, 0.0)


def flat_state_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor,
    resp_lens: torch.Tensor, *, terminal: bool = True,
) -> torch.Tensor:
    """Logits [N, V] at every real state, row-major: row 0's s_0..s_T, then row 1's, ...

    The LM head runs on exactly those N hidden states and nothing else: a pre-hook on the
    model's output embedding swaps its input for the gathered states, so whatever the model does
    to its logits afterwards (soft-capping, scaling: elementwise) still applies. No [rows, T, V]
    padding, no masked copies. Models without `get_output_embeddings` take the padded path.
    """
    n_states = resp_lens + (1 if terminal else 0)
    rows = torch.repeat_interleave(torch.arange(len(resp_lens), device=input_ids.device), n_states.to(input_ids.device))
    starts = torch.cumsum(n_states, 0) - n_states
    t = torch.arange(int(n_states.sum()), device=input_ids.device) - starts.to(input_ids.device)[rows]
    pos = prompt_lens.to(input_ids.device)[rows] - 1 + t
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        z = state_logits(model, input_ids, attention_mask, prompt_lens, resp_lens, terminal=terminal)
        return z[rows, t]
    first = int(prompt_lens.min()) - 1
    if first < 0:
        raise ValueError("a row has an empty prompt: state s_0 needs at least one prompt token (e.g. BOS)")
    keep = input_ids.shape[1] - first

    def gather(module: Any, args: tuple) -> tuple:
        h = args[0]
        offset = input_ids.shape[1] - h.shape[1]
        return (h[rows, pos - offset].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        extra = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    finally:
        handle.remove()
    return out.logits[0]


def output_head(model: Any) -> Any:
    """The model's LM head when the logits are exactly ``head(hidden)`` (a plain linear layer with no
    soft-capping or scaling after it), else None: then only the full-logits path is exact."""
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:  # e.g. a LoRA-wrapped head: its logits are not weight @ h
        return None
    cfg = getattr(inner, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    return head


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows [R, L] as one packed row [1, S] (S = real tokens), padding-free.

    Returns (input_ids [1, S], position_ids [1, S] restarting at 0 for every sequence, row starts [R]).
    transformers' Llama/Qwen attention reads the restarts: with no attention mask it builds a
    block-diagonal causal mask from the position ids (`masking_utils.find_packed_sequence_indices`;
    flash-attention varlen on a GPU), so each sequence sees only itself, as in the padded batch.
    """
    real = attention_mask.bool()
    lengths = real.sum(1)
    positions = (real.long().cumsum(1) - 1)[real]
    starts = torch.cumsum(lengths, 0) - lengths
    return input_ids[real][None], positions[None], starts


def student_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor,
    resp_lens: torch.Tensor, *, packed: bool = False,
) -> tuple[torch.Tensor, Any]:
    """The last hidden states [rows, T, d] at states s_0..s_{T−1} (the LM head's inputs), and the head.

    The model runs as usual (through any DDP / PEFT wrapper, gradient checkpointing included); a
    pre-hook on its LM head takes the head's input and hands the head an empty slice, so no logits
    are formed. Padded states hold the hidden state of the row's last real position, as in
    `state_logits`. ``packed``: the rows run as one padding-free sequence (`pack_rows`).
    Returns (None, None) when the head is not a plain linear layer (`output_head`).
    """
    head = output_head(model)
    if head is None:
        return None, None
    if int(prompt_lens.min()) < 1:
        raise ValueError("a row has an empty prompt: state s_0 needs at least one prompt token (e.g. BOS)")
    dev = input_ids.device
    captured: list[torch.Tensor] = []

    def take(module: Any, args: tuple) -> tuple:
        captured.append(args[0])
        return (args[0][:, :0], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        if packed:
            ids, position_ids, starts = pack_rows(input_ids, attention_mask)
            model(input_ids=ids, position_ids=position_ids, use_cache=False)
        else:
            starts = torch.arange(input_ids.shape[0], device=dev) * input_ids.shape[1]
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the LM head ran {len(captured)} times in one forward; expected once")
    h = captured[0]
    flat = h.reshape(-1, h.shape[-1])
    if flat.shape[0] != (int(attention_mask.sum()) if packed else input_ids.numel()):
        raise RuntimeError("the LM head did not see every position (a model that slices before its head?)")
    t = torch.arange(int(resp_lens.max()), device=dev)
    pos = prompt_lens.to(dev)[:, None] - 1 + t[None, :]
    pos = torch.minimum(pos, (prompt_lens + resp_lens).to(dev)[:, None] - 1)
    return flat[starts.to(dev)[:, None] + pos], head


def student_scores(
    model: Any, inputs: dict[str, torch.Tensor], *, chunk: int | None = None, packed: bool = False,
    logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(log π_θ(a_t|s_t) [rows, T] fp32, 0 where ~mask; logits [rows, T, V] or None) from the hidden states.

    ``chunk``: positions per LM-head chunk (`tvkd.chunked`), so no [rows, T, V] tensor is formed;
    only when ``logits`` is False (a loss that reads the student's whole distribution needs them).
    ``packed``: the padding-free forward. None when the model's head does not allow it (`output_head`).
    """
    mask = inputs["response_mask"]
    h, head = student_states(model, inputs["input_ids"], inputs["attention_mask"], inputs["prompt_lens"],
                             inputs["resp_lens"], packed=packed)
    if h is None:
        return None
    ids = inputs["response_ids"]
    if chunk and not logits:
        from tvkd.chunked import chunked_token_logps

        logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        logps[mask] = chunked_token_logps(h[mask], head.weight, head.bias, ids[mask], chunk)
        return logps, None
    z = head(h)
    return token_logps(z, ids, mask), (z if logits else None)
