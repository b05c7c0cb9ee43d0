"""The teacher cache and the reference cache: no-grad passes over the tokenized data.

Teacher cache (docs/methods.md §A.2, §B.8). A folder per (tokenized data, teacher weights and
forward dtype, vocabulary), keyed by their content; inside it, **one stage per column**, each
built the first time a loss asks for it and kept:

- ``aux-<AuxSpec.column>``: ``chosen/<column>`` and ``rejected/<column>``, per response the aux
  reward computed exactly from the full vocabulary in fp32: T+1 potentials Φ(s_0..s_T) for a
  state kind (s_T the state after EOS; Φ(s_0) is the chosen row's value on both sides, since the
  pair shares its prompt), T action values f(s_t, a_t) for an action kind;
- ``topk-<k>``: ``{side}/topk_ids``, ``{side}/topk_logprobs`` ([T, k], at s_t) and
  ``{side}/topk_rest`` (log of the probability mass outside the top k).

A request for columns that are missing runs one teacher pass computing all of them together
(and any `also` columns the caller wants while the teacher is loaded), then writes each as its
own stage. A new aux reward therefore adds its column to an existing cache without touching the
others, and no column is computed that nobody asked for. One float per aux per token plus one
list offset per response: six aux rewards at one temperature take ~24.5 bytes per token.

Two paths compute the columns, equal to fp32 rounding (tests/test_cache_onepass.py): the
full-logits path (the default: the LM head on the response states, their [N, V] logits, then
`aux_rewards.compute_aux` and a log-softmax top-k) and the one-pass path (``TVKD_CACHE_PASS=onepass``,
`tvkd.cache.onepass`: a block of the vocabulary at a time, every column folded in from that block,
no [N, V] logits). On a CPU the one pass folds each block row by row in a compiled C loop
(`tvkd.cache.fold_kernel`, built with the system C compiler on first use; ``TVKD_CACHE_KERNEL=0`` or
no compiler: its pure-torch fold, which ``TVKD_CACHE_COMPILE=1`` fuses with torch.compile).
`tvkd bench --shapes paper` measures every path against the bare forward: on a loaded 2-core CPU the
one pass with the C fold runs at 0.95-1.04 of the bare forward, the full-logits path at about 0.2.
It stays opt-in: its columns differ from today's in the last fp32 bits (another summation order),
so a study rebuilt from an empty cache would not repeat today's numbers bit for bit.

Reference cache: ``{side}/ref_logps`` [T], log π_ref(a_t|s_t).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvkd.api import AUX_REWARDS, AuxSpec
from tvkd.paths import cache_root, fingerprint
from tvkd.scoring import collate_pairs, flat_state_logits, state_logits, token_logps
from tvkd.storage import cached_stage, file_lock, read_marker, save_dataset

log = logging.getLogger(__name__)
CACHE_VERSION = 2
SIDES = ("chosen", "rejected")
TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "topk_rest")


@dataclass
class CacheResult:
    dataset: Any  # datasets.Dataset, one row per pair, aligned with the tokenized data set
    path: Path
    fingerprint: str
    stats: dict[str, Any]
    cached: bool  # nothing had to be computed
    built: list[str] = field(default_factory=list)  # the column stages computed by this call


def aux_stage(spec: AuxSpec) -> str:
    return f"aux-{spec.column}"


def topk_stage(k: int) -> str:
    return f"topk-{int(k)}"


def length_batches(ds: Any, batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Indices grouped by similar length (less padding), in a fixed order."""
    lengths = [
        len(p) + max(len(c), len(r))
        for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
    ]
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) >= batch_size or (max_tokens and (len(cur) + 1) * lengths[i] * 2 > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(int(i))
    if cur:
        batches.append(cur)
    return batches


def pair_batches(tokenized: Any, pad_id: int, batch_size: int, max_tokens: int | None, device: Any,
                 desc: str, progress: bool) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(row indices, collated pair batch on `device`) over the data set, grouped by length."""
    from tqdm.auto import tqdm

    cols = tokenized.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    for idx in tqdm(length_batches(cols, batch_size, max_tokens), desc=desc, disable=not progress, unit="batch"):
        rows = cols[idx]
        feats = [dict(prompt_ids=p, chosen_ids=c, rejected_ids=r)
                 for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])]
        yield idx, {k: v.to(device) for k, v in collate_pairs(feats, pad_id).items()}


def materialise(model: Any) -> Any:
    """A model, or a zero-argument loader called only now (a cached call loads nothing)."""
    return model() if callable(model) and not isinstance(model, torch.nn.Module) else model


def arrow_bytes(ds: Any, columns: Sequence[str] | None = None) -> int:
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    cols = columns or table.column_names
    return int(sum(table.column(c).nbytes for c in cols))


def response_tokens(tokenized: Any) -> int:
    return int(sum(len(x) for x in tokenized["chosen_ids"]) + sum(len(x) for x in tokenized["rejected_ids"]))


def _load_stage(path: Path) -> Any:
    import datasets

    return datasets.load_from_disk(str(path / "data"))


def _join(parts: list[Any]) -> Any:
    import datasets

    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts, axis=1)


def teacher_cache_path(tokenized_fingerprint: str, teacher_key: str, vocab_size: int | None,
                       cache_dir: str | Path | None = None) -> Path:
    key = fingerprint(CACHE_VERSION, "teacher", tokenized_fingerprint, teacher_key, vocab_size)
    return (Path(cache_dir) if cache_dir else cache_root() / "teacher_cache") / key


@torch.no_grad()
def build_teacher_cache(
    tokenized: Any,
    tokenized_fingerprint: str,
    teacher: Any,
    teacher_key: str,
    specs: Sequence[AuxSpec],
    *,
    topk: int | None = None,
    also: Sequence[AuxSpec] = (),
    vocab_size: int | None = None,
    pad_id: int = 0,
    batch_size: int = 32,
    max_tokens: int | None = 65536,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> CacheResult:
    """The teacher columns for `specs` (and top-k), computing in one pass only those not yet cached.

    `teacher` is a loaded causal LM or a zero-argument callable returning one (called only when
    something must be computed); `teacher_key` identifies its weights and forward dtype
    (`modeling.model_digest`). `also`: further aux columns to compute in the same pass if a pass
    runs anyway (a study sweeping aux rewards then needs one pass); they are not returned.
    `vocab_size` limits the logit rows used (a padded embedding matrix's extra rows are dropped).
    """
    specs = list(dict.fromkeys(specs))
    if not specs and not topk:
        raise ValueError("the teacher cache was asked for no aux reward and no top-k: nothing to compute")
    if topk is not None and not (isinstance(topk, int) and topk >= 1):
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    root = teacher_cache_path(tokenized_fingerprint, teacher_key, vocab_size, cache_dir)
    wanted = [aux_stage(s) for s in specs] + ([topk_stage(topk)] if topk else [])
    built: list[str] = []
    seconds = 0.0
    if any(read_marker(root / name) is None for name in wanted):
        # One process computes the missing columns; another asking for them waits, then finds them.
        with file_lock(root / ".locks" / "pass.lock", waiting=f"waiting for another process building the teacher cache {root}"):
            todo = [s for s in dict.fromkeys([*specs, *also]) if read_marker(root / aux_stage(s)) is None]
            need_topk = bool(topk) and read_marker(root / topk_stage(topk)) is None
            if todo or need_topk:
                t0 = time.perf_counter()
                columns = _teacher_pass(tokenized, materialise(teacher), todo, topk if need_topk else None,
                                        vocab_size=vocab_size, pad_id=pad_id, batch_size=batch_size,
                                        max_tokens=max_tokens, progress=progress)
                seconds = time.perf_counter() - t0
                for name, (ds, record) in columns.items():
                    cached_stage(root / name, lambda tmp, ds=ds, record=record: _save(ds, tmp, record))
                    built.append(name)
    parts = [_load_stage(root / name) for name in wanted]
    dataset = _join(parts)
    ntok = response_tokens(tokenized)
    aux_cols = [f"{side}/{s.column}" for s in specs for side in SIDES]
    stats = {
        "pairs": len(tokenized),
        "response_tokens": ntok,
        "aux_bytes_per_token": arrow_bytes(dataset, aux_cols) / max(ntok, 1) if aux_cols else 0.0,
        "bytes_per_token": arrow_bytes(dataset) / max(ntok, 1),
        "seconds": seconds,
    }
    if built:
        stats["tokens_per_second"] = ntok / max(seconds, 1e-9)
        log.info("teacher cache: computed %s (%.1fs) in %s", built, seconds, root)
    return CacheResult(dataset, root, root.name, stats, cached=not built, built=built)


def _save(ds: Any, tmp: Path, record: dict[str, Any]) -> dict[str, Any]:
    save_dataset(ds, tmp / "data")
    return record


#: How the teacher pass reads the logits: "reference" (the full logits, then `aux_rewards.compute_aux`
#: and a log-softmax top-k) or "onepass" (`tvkd.cache.onepass`: every column from one read of each
#: state's logits, no [N, V] tensor; the reference path where it does not apply). Equal to fp32
#: rounding (tests/test_cache_onepass.py); `tvkd bench --shapes paper` measures both.
PASS_METHODS = ("reference", "onepass")


def pass_method() -> str:
    """The teacher pass's method: ``TVKD_CACHE_PASS`` (reference | onepass), default reference."""
    import os

    method = os.environ.get("TVKD_CACHE_PASS", "reference")
    if method not in PASS_METHODS:
        raise ValueError(f"TVKD_CACHE_PASS={method!r}: use one of {', '.join(PASS_METHODS)}")
    return method


def compile_fold() -> bool:
    """Whether the one-pass fold runs through `torch.compile` (``TVKD_CACHE_COMPILE=1``; default off: it
    pays on long passes once compiled, and a compiler is never required)."""
    import os

    return os.environ.get("TVKD_CACHE_COMPILE", "0") == "1"


def batch_columns(model: Any, b: dict[str, torch.Tensor], specs: Sequence[AuxSpec], topk: int | None, *,
                  vocab_size: int | None, pad_id: int, method: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """One collated pair batch's columns: ({column: [N] fp32 over the states s_0..s_T of every row}, top-k
    (logprobs [A, k], ids [A, k], log rest mass [A]) at the action states s_0..s_{T-1} of every row, or None).

    `method`: "reference" or "onepass" (default `pass_method()`); the one-pass path needs a plain
    linear LM head and the paper's aux rewards, and otherwise the reference path runs."""
    from tvkd.cache.onepass import onepass_columns, reference_columns, state_hidden, supported

    method = method or pass_method()
    resp_lens = b["resp_lens"]
    nxt = None
    if any(s.kind == "action" for s in specs):
        # The token taken at each state (s_T has none: the pad id stands in, its value unused).
        nxt = torch.cat([torch.cat([ids[: int(k)], ids.new_full((1,), pad_id)])
                         for ids, k in zip(b["response_ids"], resp_lens)])
    # action states s_0..s_{T-1} of each row among the T+1 states of each row
    act = torch.cat([torch.arange(int(k), device=resp_lens.device) + int(o) for k, o in
                     zip(resp_lens, torch.cumsum(resp_lens + 1, 0) - (resp_lens + 1))]) if topk else None
    hidden = None
    if method == "onepass" and supported(specs):
        hidden, head = state_hidden(model, b["input_ids"], b["attention_mask"], b["prompt_lens"], resp_lens)
    if hidden is not None:
        weight, bias = head.weight, head.bias
        if vocab_size is not None:
            weight, bias = weight[:vocab_size], None if bias is None else bias[:vocab_size]
        if nxt is not None and nxt.device != hidden.device:
            nxt = nxt.to(hidden.device)
        fold = compile_fold()
        if not topk:
            return onepass_columns(hidden, weight, bias, nxt, specs, None, compiled=fold)
        act = act.to(hidden.device)
        if not specs:  # the top-k only, at the action states
            return {}, onepass_columns(hidden[act], weight, bias, None, [], topk, compiled=fold)[1]
        # one pass over every state; the top-k of the terminal states s_T is dropped
        cols, top = onepass_columns(hidden, weight, bias, nxt, specs, topk, compiled=fold)
        return cols, tuple(x[act] for x in top)
    z = flat_state_logits(model, b["input_ids"], b["attention_mask"], b["prompt_lens"], resp_lens)
    if vocab_size is not None:
        z = z[:, :vocab_size]
    cols, _ = reference_columns(z, nxt, specs, None) if specs else ({}, None)
    top = reference_columns(z[act.to(z.device)], None, [], topk)[1] if topk else None
    return cols, top


def _teacher_pass(tokenized: Any, model: Any, specs: list[AuxSpec], topk: int | None, *, vocab_size: int | None,
                  pad_id: int, batch_size: int, max_tokens: int | None, progress: bool) -> dict[str, tuple[Any, dict]]:
    """One no-grad teacher pass: {stage name: (its data set, its record)} for `specs` and top-k."""
    import datasets

    device = next(model.parameters()).device
    n = len(tokenized)
    values: dict[str, dict[str, list]] = {s.column: {side: [None] * n for side in SIDES} for s in specs}
    top: dict[str, list] = {f"{side}/{c}": [None] * n for side in SIDES for c in TOPK_COLUMNS}
    method = pass_method()
    for idx, b in pair_batches(tokenized, pad_id, batch_size, max_tokens, device, "teacher cache", progress):
        resp_lens = b["resp_lens"]
        vals, tk = batch_columns(model, b, specs, topk, vocab_size=vocab_size, pad_id=pad_id, method=method)
        bounds = np.cumsum((resp_lens + 1).cpu().numpy())[:-1]  # rows hold T+1 states s_0..s_T
        B = len(idx)
        for spec in specs:
            per_row = np.split(vals[spec.column].cpu().numpy(), bounds)
            for r, v in enumerate(per_row):
                side, i = SIDES[r // B], idx[r % B]
                if not spec.is_state:
                    v = v[:-1]  # action values at s_0..s_{T-1}
                elif r >= B:
                    v = np.concatenate([per_row[r - B][:1], v[1:]])  # the pair's shared s_0
                values[spec.column][side][i] = v
        if topk:
            top_lp, top_ids, rest = tk
            abounds = np.cumsum(resp_lens.cpu().numpy())[:-1]
            arrays = {"topk_ids": top_ids.int(), "topk_logprobs": top_lp, "topk_rest": rest}
            for c, x in arrays.items():
                for r, v in enumerate(np.split(x.cpu().numpy(), abounds)):
                    top[f"{SIDES[r // B]}/{c}"][idx[r % B]] = v
    out: dict[str, tuple[Any, dict]] = {}
    floats = datasets.List(datasets.Value("float32"))
    for spec in specs:
        feats = datasets.Features({f"{side}/{spec.column}": floats for side in SIDES})
        data = {f"{side}/{spec.column}": values[spec.column][side] for side in SIDES}
        record = {"spec": {"name": spec.name, "q_source": spec.q_source, "temperature": spec.temperature,
                           "kind": spec.kind}}
        out[aux_stage(spec)] = (datasets.Dataset.from_dict(data, features=feats), record)
    if topk:
        feats = {}
        for side in SIDES:
            feats[f"{side}/topk_ids"] = datasets.List(datasets.List(datasets.Value("int32"), length=topk))
            feats[f"{side}/topk_logprobs"] = datasets.List(datasets.List(datasets.Value("float32"), length=topk))
            feats[f"{side}/topk_rest"] = floats
        out[topk_stage(topk)] = (datasets.Dataset.from_dict(top, features=datasets.Features(feats)), {"topk": topk})
    return out


@torch.no_grad()
def build_reference_cache(
    tokenized: Any,
    tokenized_fingerprint: str,
    reference: Any,
    reference_key: str,
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    max_tokens: int | None = 65536,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> CacheResult:
    """One no-grad pass of the reference model: per-token log π_ref(a_t|s_t) for both responses."""
    import datasets

    key = fingerprint(CACHE_VERSION, "reference", tokenized_fingerprint, reference_key)
    path = (Path(cache_dir) if cache_dir else cache_root() / "reference_cache") / key

    def build(tmp: Path) -> dict[str, Any]:
        model = materialise(reference)
        device = next(model.parameters()).device
        n = len(tokenized)
        out = {s: [None] * n for s in SIDES}
        t0 = time.perf_counter()
        for idx, b in pair_batches(tokenized, pad_id, batch_size, max_tokens, device, "reference cache", progress):
            z = state_logits(model, b["input_ids"], b["attention_mask"], b["prompt_lens"], b["resp_lens"])
            lp = token_logps(z, b["response_ids"], b["response_mask"]).cpu().numpy()
            B = len(idx)
            for r in range(lp.shape[0]):
                out[SIDES[r // B]][idx[r % B]] = lp[r, : int(b["resp_lens"][r])]
        feats = datasets.Features({f"{s}/ref_logps": datasets.List(datasets.Value("float32")) for s in SIDES})
        save_dataset(datasets.Dataset.from_dict({f"{s}/ref_logps": out[s] for s in SIDES}, features=feats),
                     tmp / "data")
        return {"reference": reference_key, "seconds": time.perf_counter() - t0}

    stage = cached_stage(path, build, describe="the reference cache")
    ds = _load_stage(path)
    ntok = response_tokens(tokenized)
    stats = {"pairs": len(tokenized), "response_tokens": ntok, "bytes_per_token": arrow_bytes(ds) / max(ntok, 1),
             "seconds": stage.record.get("seconds", 0.0)}
    return CacheResult(ds, path, key, stats, cached=stage.cached, built=[] if stage.cached else ["ref_logps"])


def aux_specs(names: Sequence[str], value_temperatures: Sequence[float] = (2.0,),
              q_sources: Sequence[str] = ("logits",)) -> list[AuxSpec]:
    """The canonical specs of aux rewards at every value temperature and Q source (deduplicated)."""
    specs = []
    for q in q_sources:
        for name in names:
            if AUX_REWARDS.meta(name).get("uses_temperature"):
                specs.extend(AuxSpec(name, q, float(t)) for t in value_temperatures)
            else:
                specs.append(AuxSpec(name, q))
    return list(dict.fromkeys(specs))

