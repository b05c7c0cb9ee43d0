"""Per-token log-probs through the LM head in chunks of positions, without the [N, V] logits.

At the paper's scale the student's logits are the largest tensor of a training step: 4 pairs of
1,024 tokens over Llama-3's 128,256-token vocabulary are 4.2 GB in fp32, and autograd keeps them
(or their softmax) for the backward pass. But a DPO-family loss reads only log π_θ(a_t|s_t), one
number per position. `chunked_token_logps` computes those from the last hidden states, `chunk`
positions at a time, and keeps nothing of size V: its backward recomputes each chunk's logits
(one more LM-head matmul than autograd does) and turns them at once into the gradients of the
hidden states and of the head's weight. Peak memory then grows with N·d + chunk·V, not N·V.

Why a custom `torch.autograd.Function` rather than a maintained kernel. Liger-Kernel's fused
linear cross-entropy and cut-cross-entropy (`linear_cross_entropy`) solve the same memory problem
for a cross-entropy *loss*, but: (a) their memory-saving paths are Triton kernels, CUDA only, so
the CPU machines where this project's tests run could neither use nor test them (cut-cross-entropy's
CPU-capable `torch_compile` implementation forms the full ``e @ c.T`` logits); (b) here the loss
(DPO, TVKD, every sequence-level baseline) is a function of per-token log-probs, so the upstream
gradient differs at every position (``reduction="none"``). Liger computes the head's gradients in
its forward pass, which is exact only for one scalar upstream gradient (its ``reduction="none"``
weight gradients were wrong until mid-2026, Liger-Kernel issue 968); cut-cross-entropy's backward
skips softmax entries below a threshold (``filter_eps``) unless told not to. Plain torch keeps the
math exact (equal to the unchunked path to fp32 rounding, tested), runs the same on CPU and GPU,
and costs one more head matmul in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The same operations as `lm_head(h).float()` on the unchunked path: a matmul in the model's dtype,
    # then fp32 for every softmax quantity (docs/methods.md: all log-softmax in fp32).
    return F.linear(h, weight, bias).float()


class ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[a] per row of h, chunk rows at a time; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            z = _chunk_logits(hidden[s:s + chunk], weight, bias)
            out[s:s + chunk] = z.gather(1, ids[s:s + chunk, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
            del z
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, bias, ids = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk = ctx.chunk
        grad_h = torch.empty_like(hidden) if need_h else None
        # Chunks add up into fp32 (a bf16 weight's gradient is rounded once, at the end).
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_out = grad_out.float()
        for s in range(0, hidden.shape[0], chunk):
            h, a, g = hidden[s:s + chunk], ids[s:s + chunk, None], grad_out[s:s + chunk, None]
            z = _chunk_logits(h, weight, bias)
            # d log p(a)/dz = onehot(a) − softmax(z), scaled by each position's upstream gradient; in place,
            # so one [chunk, V] buffer serves logits, probabilities and their gradient.
            dz = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True)).exp_().mul_(-g)
            dz.scatter_add_(1, a, g)
            dz = dz.to(weight.dtype)
            if need_h:
                grad_h[s:s + chunk] = dz @ weight
            if need_w:
                if dz.dtype == torch.float32:
                    grad_w.addmm_(dz.t(), h)
                else:  # the matmul in the model's dtype (tensor cores), each chunk's product added up in fp32
                    grad_w += dz.t() @ h
            if need_b:
                grad_b += dz.float().sum(0)
            del z, dz
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                        chunk: int) -> torch.Tensor:
    """[N] fp32 log softmax(hidden W^T + bias)[ids] from hidden states [N, d] and an LM head [V, d].

    Equal to ``torch.log_softmax(F.linear(hidden, weight, bias).float(), -1).gather(-1, ids)`` and to
    its gradients (w.r.t. hidden, weight, bias), with at most ``chunk`` x V logits alive at a time.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 positions, got {chunk}")
    if hidden.dim() != 2 or ids.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, d] and ids [N]; got {tuple(hidden.shape)} and {tuple(ids.shape)}")
    return ChunkedTokenLogps.apply(hidden, weight, bias, ids.long(), int(chunk))
