"""The teacher cache's columns from one read of each state's logits, never forming the [N, V] logits.

The reference path (`reference_columns`) runs the LM head on the N response states, keeps their
[N, V] logits, then reads them once per reduction: `aux_rewards.compute_aux` (max, top-2,
exp-sum, Σe·z, one exp pass per value temperature β_V) and the top-k (a log-softmax copy, a
topk, a scatter and a logsumexp). Over a 128k vocabulary those reductions are memory-bound work
of the size of the LM head's matmul itself.

`onepass_columns` computes the same numbers from the last hidden states [N, d] and the head
[V, d]: a block of rows x a block of the vocabulary at a time, it forms that block's logits
(the matmul in the model's dtype, then fp32 as the reference path: docs/methods.md, all softmax
math in fp32), reads them once while they are in cache and folds them into running per-state
accumulators (the online-softmax recurrence):

- M, the running max; on a new max every exp-sum below is rescaled by exp(M_old − M_new);
- S_1 = Σ exp(z − M), W = Σ exp(z − M)·z and S_β = Σ exp((z − M)/β) for each β_V ≠ 1
  (one exp per element serves β_V = 2 and β = 1: exp(z − M) = exp((z − M)/2)²);
- z(a_t), the taken token's logit, from the block that holds it;
- the running top-K (K = max(k, 2): the top-2 serves `max` and `margin`). A block's top-K lies
  in the K sub-blocks (of 16 logits) with the largest maxima, so only those K·16 candidates go
  through a topk; the candidates that drop out of the running top-K, and every logit outside the
  candidate sub-blocks, are added to R = Σ_{outside the top-K} exp(z − M), the mass outside the
  top-k as a sum of positive terms (no 1 − Σ top cancellation; docs/methods.md §B.8).

At the end, lse = M + log S_1 and the registered aux-reward functions (`tvkd.aux_rewards`) run on
those reductions (`PassStats`), so the Q source, the kinds and the formulas are exactly theirs.
The fold above is pure torch (CPU and CUDA alike), equal to the reference path to fp32 rounding
(tests/test_cache_onepass.py: 1e-5 in fp32); it is the tested reference of the faster CPU fold.

The teacher cache takes this path with ``TVKD_CACHE_PASS=onepass`` (`tvkd.cache.teacher.pass_method`)
when the model's LM head is a plain linear layer (`scoring.output_head`: no logit soft-capping or
scaling) and every requested aux reward is one of the paper's six; otherwise the reference path.

Speed. The torch fold costs some fifty torch operations a block, each a read of the block: on one
CPU thread (512 states, vocab 128,256) 1.52 s against the head's matmul alone at 0.76 s, of which the
elementwise fold 0.51, the candidates' topk 0.23, gathers and masks 0.23 (the rest is the blocked
matmul). `compiled` (torch.compile) fuses only `_fold`, the elementwise part; topk, gather, scatter and
the candidate masks stay separate operations, which is why it gained little (0.20 of the bare forward
against 0.10-0.14 eager on a loaded 2-core CPU). On a CPU the blocks therefore go through
`tvkd.cache.fold_kernel` by default: the same fold as one C loop per logit row (block max; one
vectorised loop for e, S_1, W, S_β and the rest mass below the running top-K's smallest value τ; a
min-heap for the few logits ≥ τ), about 1 ns a logit on one core (0.82 s for the whole pass above),
into one reused fp32 buffer that the head's matmul writes with ``out=`` (no page faults for a fresh
[rows, block] tensor). What is left is the head's matmul itself: see `tvkd bench --shapes paper`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tvkd.api import AuxSpec
from tvkd.aux_rewards import LogitStats

#: The aux rewards whose value is a function of the reductions kept here (the paper's Table 5).
ONEPASS_AUX = frozenset({"logits", "log_prob", "max", "margin", "expectation", "soft_value"})

_SUB = 16  # logits per sub-block of the top-K candidate search


def supported(specs: Sequence[AuxSpec]) -> bool:
    """Whether `onepass_columns` computes every spec (the registered module of each is tvkd's own)."""
    from tvkd.api import AUX_REWARDS

    for s in specs:
        if s.name not in ONEPASS_AUX:
            return False
        fn = AUX_REWARDS.get(s.name)
        if not getattr(fn, "__module__", "").startswith("tvkd.aux_rewards."):
            return False  # a plugin re-registered the name: its function may read the full logits
    return True


def default_blocks(device: torch.device | str, kernel: bool = False) -> tuple[int, int]:
    """(rows, vocabulary columns) per block: on a CPU the torch fold's block (4 MiB of fp32 logits) stays in
    the last-level cache; the compiled fold (`kernel`) reads each row once, so its blocks are as large as
    the matmul wants (up to 128 MiB: few, large matmul calls keep 2+ threads busy; 512 x 2048 blocks ran the
    head's matmul at half speed on 2 threads); a GPU takes large blocks (512 MiB) so that few kernels
    launch. Not tuned on a GPU yet."""
    if torch.device(device).type == "cuda":
        return 8192, 16384
    return (4096, 8192) if kernel else (512, 2048)


def state_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor,
                 resp_lens: torch.Tensor, *, terminal: bool = True) -> tuple[torch.Tensor | None, Any]:
    """The LM head's inputs [N, d] at every state (row 0's s_0..s_T, then row 1's, ...; the order of
    `scoring.flat_state_logits`) and the head, with the head run on nothing; (None, None) when the
    head is not a plain linear layer (`scoring.output_head`)."""
    from tvkd.scoring import accepts_logits_to_keep, output_head

    head = output_head(model)
    if head is None:
        return None, None
    dev = input_ids.device
    n_states = (resp_lens + (1 if terminal else 0)).to(dev)
    rows = torch.repeat_interleave(torch.arange(len(resp_lens), device=dev), n_states)
    starts = torch.cumsum(n_states, 0) - n_states
    t = torch.arange(int(n_states.sum()), device=dev) - starts[rows]
    pos = prompt_lens.to(dev)[rows] - 1 + t
    first = int(prompt_lens.min()) - 1
    if first < 0:
        raise ValueError("a row has an empty prompt: state s_0 needs at least one prompt token (e.g. BOS)")
    captured: list[torch.Tensor] = []

    def take(module: Any, args: tuple) -> tuple:
        h = args[0]
        captured.append(h[rows, pos - (input_ids.shape[1] - h.shape[1])])
        return (h[:, :0], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        extra = {"logits_to_keep": input_ids.shape[1] - first} if accepts_logits_to_keep(model) else {}
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the LM head ran {len(captured)} times in one forward; expected once")
    return captured[0], head


class PassStats(LogitStats):
    """The reductions of `aux_rewards.LogitStats`, from the one-pass accumulators (no logits kept).

    `z` has the logits' shape on the meta device (shape only), for the functions that check it."""

    def __init__(  # noqa: D107 - LogitStats' reductions are given, not computed from z
self, n: int, v: int, device: torch.device, *, max: torch.Tensor, lse: torch.Tensor,
                 top2: torch.Tensor, expected_logit: torch.Tensor, tempered: dict[float, torch.Tensor],
                 actions: torch.Tensor | None, taken: torch.Tensor | None):
        self.z = torch.empty((n, v), device="meta")
        self.max, self.lse, self.top2, self.expected_logit = max, lse, top2, expected_logit
        self._tempered, self._actions, self._taken = tempered, actions, taken

    def tempered_lse(self, temperature: float) -> torch.Tensor:
        t = float(temperature)
        return self.lse if t == 1.0 else self._tempered[t]

    def gather(self, actions: torch.Tensor) -> torch.Tensor:
        if self._taken is None or actions is not self._actions:
            raise ValueError("the one-pass statistics hold z(a) only for the action ids they were computed with")
        return self._taken


def _fold(zb: torch.Tensor, m: torch.Tensor, s1: torch.Tensor, w: torch.Tensor, sbs: tuple[torch.Tensor, ...],
          betas: tuple[float, ...], half: bool, want_w: bool, sub_sums: bool, sub_max: bool):
    """Fold one block of logits zb [R, Vb] into the running (max, S_1, W, S_β): the elementwise part of
    the pass (`torch.compile` fuses it into one or two loops over the block). Also the block's
    sub-block maxima and, for the rest mass, its sub-block sums of exp(z − M) ([R, Vb/16] each)."""
    m_new = torch.maximum(m, zb.amax(-1))
    delta = m - m_new  # <= 0; -inf on the first block (every sum is then 0 anyway)
    scale = delta.exp()
    d = zb - m_new[:, None]
    out = []
    for b, s in zip(betas, sbs):
        if not (half and b == 2.0):
            s = s * (delta / b).exp() + (d / b).exp().sum(-1)
        out.append(s)
    if half:
        e2 = (d * 0.5).exp()
        i = betas.index(2.0)
        out[i] = sbs[i] * (delta * 0.5).exp() + e2.sum(-1)
        e = e2 * e2
    else:
        e = d.exp()
    s1 = s1 * scale + e.sum(-1)
    if want_w:
        w = w * scale + (e * zb).sum(-1)
    r = zb.shape[0]
    smax = zb.view(r, -1, _SUB).amax(-1) if sub_max else None
    ssum = e.view(r, -1, _SUB).sum(-1) if sub_sums else None
    return m_new, scale, s1, w, tuple(out), smax, ssum


_COMPILED: dict[str, object] = {}


def _folder(compiled: bool):
    """`_fold`, compiled once per process when asked (`torch.compile`; eager when it cannot compile)."""
    if not compiled:
        return _fold
    if "fold" not in _COMPILED:
        _COMPILED["fold"] = torch.compile(_fold, dynamic=True)
    return _COMPILED["fold"]


_ARANGE_SUB = torch.arange(_SUB)


@torch.no_grad()
def onepass_columns(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    next_ids: torch.Tensor | None, specs: Sequence[AuxSpec], topk: int | None = None, *,
                    rows: int | None = None, block: int | None = None, compiled: bool = False,
                    kernel: bool | None = None) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Every aux column of `specs` ({column: [N] fp32}) and the top-k ((logprobs [N, k] fp32, ids [N, k]
    int64, log rest mass [N] fp32) or None) of the logits ``hidden @ weight.T + bias`` [N, V], from one
    read of each logit. `next_ids` [N]: the token taken at each state (action kinds; any valid id at
    a state with none). `rows` x `block`: the block shape (default `default_blocks`). `kernel`: fold each
    block with the compiled C loop (`tvkd.cache.fold_kernel`; CPU only); default: on a CPU where it
    builds; False: the pure-torch fold (`compiled`: through torch.compile)."""
    from tvkd.aux_rewards import aux_reward

    specs = list(dict.fromkeys(specs))
    if not supported(specs):
        raise ValueError(f"one-pass columns cover {sorted(ONEPASS_AUX)}; got {[s.name for s in specs]}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, d] and weight [V, d] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    if any(s.kind == "action" for s in specs) and next_ids is None:
        raise ValueError("an action aux reward needs next_ids")
    if topk is not None and not 1 <= topk <= v:
        raise ValueError(f"topk must be in 1..{v} (the vocabulary), got {topk}")
    if any(s.name == "margin" for s in specs) and v < 2:
        raise ValueError("the margin aux reward needs a vocabulary of at least 2 tokens")
    from tvkd.cache import fold_kernel

    if kernel is None:
        kernel = dev.type == "cpu" and fold_kernel.available()
    elif kernel and not (dev.type == "cpu" and fold_kernel.available()):
        raise ValueError("the compiled one-pass fold needs a CPU and a C compiler (TVKD_CACHE_KERNEL unset or 1)")
    use_kernel = kernel
    d_rows, d_block = default_blocks(dev, use_kernel)
    rows, block = rows or d_rows, block or d_block
    k = max(topk or 0, min(2, v))
    betas = sorted({float(s.temperature) for s in specs if s.name == "soft_value" and float(s.temperature) != 1.0})
    half = 2.0 in betas  # exp(z − M) as exp((z − M)/2)²: one exp per logit for β_V ∈ {1, 2}
    want_w = any(s.name == "expectation" for s in specs)
    want_a = next_ids is not None and any(s.kind == "action" for s in specs)
    f32 = dict(dtype=torch.float32, device=dev)
    out_max, out_s1, out_w = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    out_sb = {b: torch.empty(n, **f32) for b in betas}
    out_a = torch.empty(n, **f32) if want_a else None
    out_top = torch.empty(n, k, **f32)
    out_ids = torch.empty(n, k, dtype=torch.long, device=dev)
    out_rest = torch.empty(n, **f32) if topk else None
    fold = None if use_kernel else _folder(compiled)
    betas = tuple(betas)
    for r0 in range(0, n, rows):
        h = hidden[r0:r0 + rows]
        r = h.shape[0]
        if use_kernel:
            m, s1, w, sb, taken, top_v, top_i, rest = _kernel_chunk(
                h, weight, bias, next_ids[r0:r0 + r] if want_a else None, k, betas, want_w, bool(topk), block)
        else:
            m = torch.full((r,), float("-inf"), **f32)
            s1, w, rest = torch.zeros(r, **f32), torch.zeros(r, **f32), torch.zeros(r, **f32)
            sb = {b: torch.zeros(r, **f32) for b in betas}
            taken = torch.zeros(r, **f32) if want_a else None
            ids_r = next_ids[r0:r0 + r].long() if want_a else None
            top_v = torch.full((r, 0), float("-inf"), **f32)
            top_i = torch.zeros((r, 0), dtype=torch.long, device=dev)
            for v0 in range(0, v, block):
                zb = F.linear(h, weight[v0:v0 + block], None if bias is None else bias[v0:v0 + block]).float()
                vb = zb.shape[1]
                nsub = -(-vb // _SUB)
                sub = bool(topk) and nsub > k  # the top-K from the k sub-blocks with the largest maxima
                if nsub > k and vb % _SUB:  # pad the last block to whole sub-blocks (a value exp sends to 0)
                    zb = F.pad(zb, (0, nsub * _SUB - vb), value=torch.finfo(torch.float32).min)
                sbs = tuple(sb[b] for b in betas)
                m_new, scale, s1, w, sbs, sub_max, sub_sum = fold(zb, m, s1, w, sbs, betas, half, want_w, sub, nsub > k)
                sb = dict(zip(betas, sbs))
                if want_a:
                    local = ids_r - v0
                    inside = (local >= 0) & (local < vb)
                    got = zb.gather(1, local.clamp(0, vb - 1)[:, None]).squeeze(1)
                    taken = torch.where(inside, got, taken)
                if nsub > k:
                    sel = sub_max.topk(k, dim=-1, sorted=False).indices  # [R, k]
                    cand = zb.view(r, nsub, _SUB).gather(1, sel[:, :, None].expand(r, k, _SUB)).reshape(r, k * _SUB)
                    cand_ids = (sel[:, :, None] * _SUB + _ARANGE_SUB.to(dev) + v0).reshape(r, k * _SUB)
                else:
                    cand, cand_ids = zb, torch.arange(v0, v0 + vb, device=dev).expand(r, vb)
                if topk:
                    rest.mul_(scale)
                    if sub:  # the mass of the sub-blocks that are not candidates
                        rest.add_(sub_sum.scatter_(1, sel, 0.0).sum(-1))
                merged = torch.cat([top_v, cand], 1)
                merged_ids = torch.cat([top_i, cand_ids], 1)
                kk = min(k, merged.shape[1])
                top_v, where = merged.topk(kk, dim=-1)
                top_i = merged_ids.gather(1, where)
                if topk:  # the candidates (old top-K included) that are not in the new top-K
                    dropped = torch.ones_like(merged, dtype=torch.bool).scatter_(1, where, False)
                    rest.add_(torch.where(dropped, (merged - m_new[:, None]).exp(), 0.0).sum(-1))
                m = m_new
                del zb, cand, merged
        sl = slice(r0, r0 + r)
        out_max[sl], out_s1[sl], out_w[sl] = m, s1, w
        for b in betas:
            out_sb[b][sl] = sb[b]
        if want_a:
            out_a[sl] = taken
        out_top[sl], out_ids[sl] = top_v, top_i
        if topk:  # K = 2 > k = 1: the second largest is outside the top-k too
            out_rest[sl] = rest + (top_v[:, topk:] - m[:, None]).exp().sum(-1)
    lse = out_max + out_s1.log()
    # logsumexp(z/β) = M/β + log S_β, as `LogitStats.tempered_lse`
    tempered = {b: out_max / b + out_sb[b].log() for b in betas}
    top2 = out_top[:, :2] if k >= 2 else out_top[:, :1]
    stats = PassStats(n, v, dev, max=out_max, lse=lse, top2=top2, expected_logit=out_w / out_s1,
                      tempered=tempered, actions=next_ids, taken=out_a)
    columns = {s.column: aux_reward(s, stats, next_ids).float() for s in specs}
    top = None
    if topk:
        top = (out_top[:, :topk] - lse[:, None], out_ids[:, :topk], out_rest.log() + out_max - lse)
    return columns, top


def _kernel_chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor | None, k: int,
                  betas: tuple[float, ...], want_w: bool, want_rest: bool, block: int):
    """One chunk of rows through the compiled fold: the block's logits (the head's matmul in the model's
    dtype, written into one reused fp32 buffer) folded row by row (`fold_kernel.FoldState`)."""
    from tvkd.cache.fold_kernel import FoldState

    r, v = h.shape[0], weight.shape[0]
    st = FoldState(r, k, betas, want_w, ids is not None, want_rest)
    ids = None if ids is None else ids.long().contiguous()
    buf = torch.empty(r * min(block, v), dtype=torch.float32)
    for v0 in range(0, v, block):
        wb = weight[v0:v0 + block]
        zb = buf[: r * wb.shape[0]].view(r, wb.shape[0])
        bb = None if bias is None else bias[v0:v0 + block]
        if h.dtype == torch.float32 and wb.dtype == torch.float32:
            if bb is None:
                torch.mm(h, wb.t(), out=zb)
            else:
                torch.addmm(bb.float(), h, wb.t(), out=zb)
        else:  # the matmul in the model's dtype, as the LM head; the fold in fp32
            zb.copy_(F.linear(h, wb, bb))
        st.fold(zb, v0, ids)
    top_v, top_i = st.top()
    sb = {b: st.sb[i] for i, b in enumerate(betas)}
    return st.m, st.s1, st.w, sb, st.taken, top_v, top_i, st.rest


def reference_columns(logits: torch.Tensor, next_ids: torch.Tensor | None, specs: Sequence[AuxSpec],
                      topk: int | None = None
                      ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """The same outputs as `onepass_columns` from the full logits [N, V]: `aux_rewards.compute_aux` and
    a log-softmax top-k (the tested reference path)."""
    from tvkd.aux_rewards import compute_aux

    columns = compute_aux(logits, next_ids, specs) if specs else {}
    top = None
    if topk:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top_lp, top_ids = logp.topk(topk, dim=-1)
        # log of the mass outside the top k, as a logsumexp over the rest (stable; docs/methods.md §B.8).
        rest = logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
        top = (top_lp, top_ids, rest)
    return columns, top
