"""The teacher cache and the reference cache: one no-grad pass each over the tokenized data.

Teacher cache, per response (chosen and rejected) of every pair, computed exactly from the full
vocabulary in fp32 (METHODS A.2) and stored compactly:
- ``{side}/teacher``: list over response tokens t of a fixed-size vector holding, in the order of
  ``layout["token_fields"]``, every action aux at (s_t, a_t) then every state aux at s_{t+1}
  (so the T tokens carry the states s_1..s_T, the last one the state after EOS);
- ``prompt/teacher``: the state aux at s_0, shared by the pair (stored once);
- with ``topk``: ``{side}/topk_ids``, ``{side}/topk_logprobs`` ([T, k], at s_t) and
  ``{side}/topk_rest`` (log of the probability mass outside the top k).
That is one float per aux per token plus one offset per response: six aux rewards at one
temperature take 24 bytes per token, each further temperature 4 more.

Reference cache: ``{side}/ref_logps`` [T], log π_ref(a_t|s_t).

`expand_teacher_columns` turns the compact layout into the per-need columns the losses read:
``{side}/<AuxSpec.column>`` with T+1 potentials (state kinds, s_0..s_T) or T action values.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvkd.losses.base import AuxSpec
from tvkd.paths import cache_root, fingerprint
from tvkd.scoring import collate_pairs, flat_state_logits, state_logits, token_logps

log = logging.getLogger(__name__)
CACHE_VERSION = 1
SIDES = ("chosen", "rejected")


@dataclass
class CacheResult:
    dataset: Any  # datasets.Dataset, one row per pair, aligned with the tokenized data set
    path: Path
    fingerprint: str
    layout: dict[str, Any]
    stats: dict[str, Any]
    cached: bool


def default_specs(value_temperatures: Sequence[float] = (2.0,), q_sources: Sequence[str] = ("logits",)) -> list[AuxSpec]:
    """Every registered aux reward; soft_value once per β_V."""
    from tvkd.aux_rewards import AUX_REWARDS

    specs = []
    for q in q_sources:
        for name in AUX_REWARDS.names():
            if AUX_REWARDS.meta(name).get("uses_temperature"):
                specs.extend(AuxSpec(name, q, float(t)) for t in value_temperatures)
            else:
                specs.append(AuxSpec(name, q))
    return specs


def _kind(spec: AuxSpec) -> str:
    from tvkd.aux_rewards import AUX_REWARDS

    return AUX_REWARDS.meta(spec.name)["kind"]


def _length_batches(ds: Any, batch_size: int, max_tokens: int | None) -> list[list[int]]:
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


def _batches(tokenized: Any, pad_id: int, batch_size: int, max_tokens: int | None, device: Any, desc: str,
             progress: bool):
    """(row indices, collated pair batch on `device`) over the data set, grouped by length."""
    from tqdm.auto import tqdm

    cols = tokenized.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    for idx in tqdm(_length_batches(cols, batch_size, max_tokens), desc=desc, disable=not progress, unit="batch"):
        rows = cols[idx]
        feats = [dict(prompt_ids=p, chosen_ids=c, rejected_ids=r)
                 for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])]
        yield idx, {k: v.to(device) for k, v in collate_pairs(feats, pad_id).items()}


def _write_atomically(path: Path, ds: Any, meta: dict[str, Any]) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ds.save_to_disk(str(tmp / "data"))
    (tmp / "done.json").write_text(json.dumps(meta, indent=2, default=str))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _load_done(path: Path) -> tuple[Any, dict] | None:
    import datasets

    if not (path / "done.json").exists():
        return None
    return datasets.load_from_disk(str(path / "data")), json.loads((path / "done.json").read_text())


def _lookup(kind: str, key: str, cache_dir: str | Path | None) -> tuple[Path, CacheResult | None]:
    """(where the cache lives, the finished cache if it is there)."""
    path = (Path(cache_dir) if cache_dir else cache_root() / kind) / key
    done = _load_done(path)
    if done is None:
        return path, None
    return path, CacheResult(done[0], path, key, done[1]["layout"], done[1]["stats"], cached=True)


def _materialise(model: Any) -> Any:
    """A model, or a zero-argument loader called only now (a cached call loads nothing)."""
    return model() if callable(model) and not isinstance(model, torch.nn.Module) else model


def arrow_bytes(ds: Any, columns: Sequence[str] | None = None) -> int:
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    cols = columns or table.column_names
    return int(sum(table.column(c).nbytes for c in cols))


def response_tokens(tokenized: Any) -> int:
    return int(sum(len(x) for x in tokenized["chosen_ids"]) + sum(len(x) for x in tokenized["rejected_ids"]))


@torch.no_grad()
def build_teacher_cache(
    tokenized: Any,
    tokenized_fingerprint: str,
    teacher: Any,
    teacher_key: str,
    specs: Sequence[AuxSpec],
    *,
    topk: int | None = None,
    vocab_size: int | None = None,
    pad_id: int = 0,
    batch_size: int = 32,
    max_tokens: int | None = 65536,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> CacheResult:
    """One no-grad teacher pass computing every requested aux (and top-k) per response position.

    `teacher` is a loaded causal LM (or a zero-argument callable returning one, so a cached call
    loads nothing); `teacher_key` identifies its weights (`modeling.model_digest`).
    `vocab_size` limits the logit rows used (a padded embedding matrix's extra rows are dropped).
    """
    import datasets

    from tvkd.aux_rewards import compute_aux

    specs = list(dict.fromkeys(specs))
    action = [s for s in specs if _kind(s) == "action"]
    state = [s for s in specs if _kind(s) == "state"]
    layout = {
        "token_fields": [s.column for s in action] + [s.column for s in state],
        "state_fields": [s.column for s in state],
        "specs": [vars(s) for s in specs],
        "topk": topk,
    }
    key = fingerprint(CACHE_VERSION, "teacher", tokenized_fingerprint, teacher_key, layout, vocab_size)
    path, found = _lookup("teacher_cache", key, cache_dir)
    if found is not None:
        return found
    model = _materialise(teacher)
    device = next(model.parameters()).device
    n = len(tokenized)
    token_rows: dict[str, list] = {s: [None] * n for s in SIDES}
    prompt_rows: list = [None] * n
    topk_rows: dict[str, list] = {f"{s}/{c}": [None] * n for s in SIDES for c in ("topk_ids", "topk_logprobs", "topk_rest")}
    t0 = time.perf_counter()
    for idx, b in _batches(tokenized, pad_id, batch_size, max_tokens, device, "teacher cache", progress):
        resp_lens = b["resp_lens"]
        z = flat_state_logits(model, b["input_ids"], b["attention_mask"], b["prompt_lens"], resp_lens)
        if vocab_size is not None:
            z = z[:, :vocab_size]
        # The token taken at each state (s_T has none: the pad id stands in, its value unused).
        nxt = torch.cat([torch.cat([ids[: int(k)], ids.new_full((1,), pad_id)])
                         for ids, k in zip(b["response_ids"], resp_lens)])
        vals = compute_aux(z, nxt, specs)  # one pass: action and state specs share the reductions
        flat = torch.stack([vals[s.column] for s in action + state], -1).cpu().numpy()  # [N, K]
        na = len(action)
        bounds = np.cumsum((resp_lens + 1).cpu().numpy())[:-1]
        per_row = np.split(flat, bounds)
        rows = len(per_row)
        if topk:
            # action states s_0..s_{T-1} of each row inside the flat [N, V] logits
            act = torch.cat([torch.arange(int(k), device=z.device) + int(o) for k, o in
                             zip(resp_lens, torch.cumsum(resp_lens + 1, 0) - (resp_lens + 1))])
            logp = torch.log_softmax(z[act].float(), dim=-1)
            top_lp, top_ids = logp.topk(topk, dim=-1)
            # log of the mass outside the top k, as a logsumexp over the rest (stable; METHODS B §8).
            rest = logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
            top_lp, top_ids, rest = top_lp.cpu().numpy(), top_ids.cpu().numpy(), rest.cpu().numpy()
            abounds = np.cumsum(resp_lens.cpu().numpy())[:-1]
            top_lp, top_ids, rest = (np.split(x, abounds) for x in (top_lp, top_ids, rest))
        B = len(idx)
        for r in range(rows):
            side, i = SIDES[r // B], idx[r % B]
            v = per_row[r]  # [T+1, K]: states s_0..s_T
            # token t: action values at s_t, state values at s_{t+1}
            token_rows[side][i] = np.concatenate([v[:-1, :na], v[1:, na:]], axis=1)
            if r < B:
                prompt_rows[i] = v[0, na:]
            if topk:
                topk_rows[f"{side}/topk_ids"][i] = top_ids[r].astype(np.int32)
                topk_rows[f"{side}/topk_logprobs"][i] = top_lp[r]
                topk_rows[f"{side}/topk_rest"][i] = rest[r]
    seconds = time.perf_counter() - t0
    if not len(layout["token_fields"]):
        raise ValueError("the teacher cache was asked for no aux reward and no top-k: nothing to compute")
    K, Ks = len(layout["token_fields"]), max(1, len(state))
    feats = {
        "chosen/teacher": datasets.List(datasets.List(datasets.Value("float32"), length=K)),
        "rejected/teacher": datasets.List(datasets.List(datasets.Value("float32"), length=K)),
        "prompt/teacher": datasets.List(datasets.Value("float32"), length=Ks),
    }
    data = {
        "chosen/teacher": token_rows["chosen"],
        "rejected/teacher": token_rows["rejected"],
        "prompt/teacher": [p if len(state) else np.zeros(1, np.float32) for p in prompt_rows],
    }
    if topk:
        for s in SIDES:
            feats[f"{s}/topk_ids"] = datasets.List(datasets.List(datasets.Value("int32"), length=topk))
            feats[f"{s}/topk_logprobs"] = datasets.List(datasets.List(datasets.Value("float32"), length=topk))
            feats[f"{s}/topk_rest"] = datasets.List(datasets.Value("float32"))
            for c in ("topk_ids", "topk_logprobs", "topk_rest"):
                data[f"{s}/{c}"] = topk_rows[f"{s}/{c}"]
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(feats))
    ntok = response_tokens(tokenized)
    aux_cols = ["chosen/teacher", "rejected/teacher", "prompt/teacher"]
    stats = {
        "pairs": n,
        "response_tokens": ntok,
        "aux_bytes_per_token": arrow_bytes(ds, aux_cols) / max(ntok, 1),
        "bytes_per_token": arrow_bytes(ds) / max(ntok, 1),
        "seconds": seconds,
        "tokens_per_second": ntok / max(seconds, 1e-9),
    }
    _write_atomically(path, ds, {"layout": layout, "stats": stats, "teacher": teacher_key})
    done = _load_done(path)
    log.info("teacher cache: %d pairs, %.1f bytes per response token (%s)", n, stats["bytes_per_token"], path)
    return CacheResult(done[0], path, key, layout, stats, cached=False)


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
    path, found = _lookup("reference_cache", key, cache_dir)
    if found is not None:
        return found
    model = _materialise(reference)
    device = next(model.parameters()).device
    n = len(tokenized)
    out = {s: [None] * n for s in SIDES}
    t0 = time.perf_counter()
    for idx, b in _batches(tokenized, pad_id, batch_size, max_tokens, device, "reference cache", progress):
        z = state_logits(model, b["input_ids"], b["attention_mask"], b["prompt_lens"], b["resp_lens"])
        lp = token_logps(z, b["response_ids"], b["response_mask"]).cpu().numpy()
        B = len(idx)
        for r in range(lp.shape[0]):
            out[SIDES[r // B]][idx[r % B]] = lp[r, : int(b["resp_lens"][r])]
    seconds = time.perf_counter() - t0
    feats = datasets.Features({f"{s}/ref_logps": datasets.List(datasets.Value("float32")) for s in SIDES})
    ds = datasets.Dataset.from_dict({f"{s}/ref_logps": out[s] for s in SIDES}, features=feats)
    ntok = response_tokens(tokenized)
    stats = {"pairs": n, "response_tokens": ntok, "bytes_per_token": arrow_bytes(ds) / max(ntok, 1),
             "seconds": seconds}
    _write_atomically(path, ds, {"layout": {"ref": True}, "stats": stats, "reference": reference_key})
    done = _load_done(path)
    return CacheResult(done[0], path, key, {"ref": True}, stats, cached=False)


def expand_teacher_columns(ds: Any, layout: dict[str, Any], specs: Sequence[AuxSpec], *, keep_compact: bool = False) -> Any:
    """Add ``{side}/<spec.column>`` columns (T+1 potentials for state kinds, T values for action kinds)."""
    fields = layout["token_fields"]
    state_fields = layout["state_fields"]
    missing = [s.column for s in specs if s.column not in fields]
    if missing:
        raise KeyError(f"the teacher cache has no {missing}; it holds {fields}. Rebuild it with those aux rewards.")
    want = [(s.column, fields.index(s.column), state_fields.index(s.column) if s.column in state_fields else None)
            for s in specs]

    def expand(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {}
        for side in SIDES:
            toks = [np.asarray(x, dtype=np.float32).reshape(-1, len(fields)) for x in batch[f"{side}/teacher"]]
            for col, j, js in want:
                if js is None:
                    out[f"{side}/{col}"] = [t[:, j] for t in toks]
                else:
                    out[f"{side}/{col}"] = [
                        np.concatenate([np.asarray(p, dtype=np.float32)[js: js + 1], t[:, j]])
                        for p, t in zip(batch["prompt/teacher"], toks)
                    ]
        return out

    ds = ds.map(expand, batched=True, batch_size=256, desc="expand teacher columns")
    if not keep_compact:
        ds = ds.remove_columns(["chosen/teacher", "rejected/teacher", "prompt/teacher"])
    return ds
