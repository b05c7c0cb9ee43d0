"""`tvkd bench --shapes paper`: the teacher cache and the TVKD training step on the paper's model shapes.

No weights are downloaded: a model with the real architecture and random weights costs exactly what
the real one costs. The configurations below are written from the published config.json of
meta-llama/Llama-3.2-1B (the student) and meta-llama/Llama-3.1-8B (the teacher); both use
Llama-3's 128,256-token vocabulary and llama3 RoPE scaling at θ = 500,000.

On a CUDA GPU the real shapes run in bf16 (fp32 loss math) on synthetic token batches of the
paper's lengths; on a CPU, scaled-down models with the **same vocabulary** (the vocabulary is
what the logits' memory grows with), in fp32, each configuration in a fresh process so that its
peak resident memory (`resource.getrusage` ru_maxrss; tracemalloc does not see torch's
allocations) is its own. Measured:

- teacher cache: the cache's no-grad pass (`scoring.flat_state_logits` + the six aux rewards of
  Table 5 at one temperature, `aux_rewards.compute_aux`), tokens/s and MFU;
- TVKD training step (forward, loss, backward, AdamW) through `PreferenceTrainer.compute_loss`,
  tokens/s, MFU and peak memory, for every combination of chunked log-probs
  (`train.logprob_chunk`) and padding-free batches (`train.padding_free`); on a CPU also the
  loss and every parameter gradient of each configuration against the plain one (fp32).

MFU = model FLOPs / (time x peak). Model FLOPs per sequence of S tokens with R scored states:
forward 2·P·S (P: the decoder's weights, embeddings excluded) + 2·L·S²·d_attn (causal attention:
QK^T and AV, halved) + 2·d·V·R (the LM head on the scored states); a training step is 3x the
forward. The chunked path's extra head matmul in its backward is work done, not model FLOPs.
The peak is the GPU's dense bf16 rate (H100/H200 989 TFLOP/s; `TVKD_PEAK_TFLOPS` overrides);
on a CPU no MFU is reported (achieved TFLOP/s are).

Attention is sdpa everywhere. A padding-free batch under sdpa gets transformers' block-diagonal
mask over the whole pack (correct, but attention then costs (Σ S)² instead of Σ S²); with
flash-attn installed on a GPU, the padding-free configurations are also measured with its varlen
kernels (``flash_attention_2``), the setting padding-free is meant for.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

_LLAMA3 = {
    "vocab_size": 128256, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64,
}
LLAMA_3_2_1B = {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
LLAMA_3_1_8B = {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
# CPU: the same vocabulary and family, scaled down in depth and width.
CPU_STUDENT = {**LLAMA_3_2_1B, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}
CPU_TEACHER = {**LLAMA_3_1_8B, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}

# Synthetic batches: pairs x (prompt + response <= total) tokens; response lengths drawn in
# [resp/2, resp] per row, so a batch has the padding real data has.
SHAPES = {
    "cuda": {"student": LLAMA_3_2_1B, "teacher": LLAMA_3_1_8B, "dtype": "bfloat16", "chunk": 1024,
             "train": [(4, 256, 768), (4, 512, 1536)], "cache": (8, 256, 768),
             "steps": 6, "warmup": 2, "cache_batches": 6, "cache_repeats": 1,
             "order": {"pairs": 96, "median": 400, "longest": 2048, "batch": 8}},
    "cpu": {"student": CPU_STUDENT, "teacher": CPU_TEACHER, "dtype": "float32", "chunk": 256,
            "train": [(4, 64, 448)], "cache": (4, 64, 448), "steps": 2, "warmup": 1, "cache_batches": 2,
            "cache_repeats": 3,
            "order": {"pairs": 16, "median": 64, "longest": 256, "batch": 4}},
    # a smoke test of this benchmark's own logic (tests, `tests/gpu_paper_shapes.sh --dry-run`)
    "tiny": {"student": {**CPU_STUDENT, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "bos_token_id": 1,
                         "eos_token_id": 2},
             "teacher": {**CPU_TEACHER, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "bos_token_id": 1,
                         "eos_token_id": 2},
             "dtype": "float32", "chunk": 16, "train": [(2, 8, 24)], "cache": (2, 8, 24), "steps": 1, "warmup": 1,
             "cache_batches": 1, "cache_repeats": 1, "order": {"pairs": 6, "median": 40, "longest": 96, "batch": 2}},
}
OPTIONS = {"plain": {}, "chunked": {"logprob_chunk": True}, "padding_free": {"padding_free": True},
           "chunked+padding_free": {"logprob_chunk": True, "padding_free": True}}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


def llama_config(spec: dict[str, Any], attention: str = "sdpa") -> Any:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**spec)
    cfg._attn_implementation = attention
    return cfg


def random_model(spec: dict[str, Any], device: str, dtype: torch.dtype, seed: int = 0, attention: str = "sdpa") -> Any:
    """A Llama with `spec`'s architecture and random weights, built directly on `device` in `dtype`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(spec, attention))
    finally:
        torch.set_default_dtype(default)
    return model


def synthetic_pairs(pairs: int, prompt: int, response: int, vocab: int, seed: int = 0, bos: int = 128000,
                    eos: int = 128001) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(0, vocab, (k,), generator=g).tolist()

    def length() -> int:
        return int(torch.randint(response // 2, response + 1, (1,), generator=g))

    return [{"prompt_ids": [bos] + ids(prompt - 1), "chosen_ids": ids(length() - 1) + [eos],
             "rejected_ids": ids(length() - 1) + [eos]} for _ in range(pairs)]


def model_flops(spec: dict[str, Any], seq_lens: list[int], scored: int, train: bool) -> float:
    """Model FLOPs of one forward (x3 for a training step) over sequences of `seq_lens` tokens with
    `scored` states through the LM head (see the module docstring)."""
    d, L, V = spec["hidden_size"], spec["num_hidden_layers"], spec["vocab_size"]
    hd = spec.get("head_dim") or d // spec["num_attention_heads"]
    q, kv = spec["num_attention_heads"] * hd, spec["num_key_value_heads"] * hd
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * spec["intermediate_size"]
    tokens = sum(seq_lens)
    fwd = 2 * L * per_layer * tokens + 2 * L * q * sum(s * s for s in seq_lens) + 2 * d * V * scored
    return float(fwd * (3 if train else 1))


def peak_tflops(device: str) -> float | None:
    if os.environ.get("TVKD_PEAK_TFLOPS"):
        return float(os.environ["TVKD_PEAK_TFLOPS"])
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_memory(device: str) -> dict[str, float]:
    if device == "cuda":
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
    import resource

    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}  # KiB on Linux


def _tvkd_trainer(model: Any, device: str, batch: int, chunk: int | None, padding_free: bool) -> Any:
    """The `PreferenceTrainer` of a TVKD (soft_value) step on ``model``, as the benchmark parts time it."""
    from transformers import TrainingArguments

    from tvkd.losses import LOSSES, build_config
    from tvkd.training.trainer import PreferenceCollator, PreferenceTrainer

    loss_cls = LOSSES.get("tvkd")
    cfg = build_config(loss_cls, {"aux": "soft_value"})
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, use_cpu=device == "cpu", report_to="none",
                                 remove_unused_columns=False, per_device_train_batch_size=batch)
        return PreferenceTrainer(model=model, args=args, train_dataset=[{}],
                                 data_collator=PreferenceCollator(0, {"tvkd_offset": "pair"}, True),
                                 loss=loss_cls(), loss_config=cfg, logprob_chunk=chunk, padding_free=padding_free)


def train_step_run(spec: dict[str, Any], shape: tuple[int, int, int], options: dict[str, Any], *, device: str,
                   dtype: str, chunk: int, steps: int, warmup: int, grads_out: str | None = None) -> dict[str, Any]:
    """Median TVKD step (forward, loss, backward, AdamW) of a random `spec` model on one synthetic batch.

    The steps repeat one batch at learning rate 0, so every configuration computes the same numbers
    at every step (the optimizer's work is the same at any rate); `grads_out` (a safetensors file)
    receives the last step's loss and parameter gradients, read after the memory peak is taken.
    """

    from tvkd.scoring import collate_pairs

    torch_dtype = getattr(torch, dtype)
    attention = options.get("attention", "sdpa")
    model = random_model(spec, device, torch_dtype, attention=attention).train()
    pairs, prompt, response = shape
    batch = collate_pairs(synthetic_pairs(pairs, prompt, response, spec["vocab_size"], bos=spec["bos_token_id"],
                                                eos=spec["eos_token_id"]), pad_id=0)
    g = torch.Generator().manual_seed(1)
    batch["ref_logps"] = -torch.rand(batch["response_ids"].shape, generator=g) * batch["response_mask"] * 10
    batch["col:tvkd_offset"] = torch.randn(pairs, generator=g)
    batch = {k: v.to(device) for k, v in batch.items()}
    trainer = _tvkd_trainer(model, device, pairs, chunk if options.get("logprob_chunk") else None,
                            bool(options.get("padding_free")))
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for step in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        if step < warmup + steps - 1 or grads_out is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[warmup:])
    seq_lens = (batch["attention_mask"].sum(1)).tolist()
    flops = model_flops(spec, seq_lens, int(batch["resp_lens"].sum()), train=True)
    out = {"pairs": pairs, "prompt": prompt, "response_max": response, "tokens": int(sum(seq_lens)),
           "padded_tokens": int(batch["attention_mask"].numel()), "step_s": step_s, "tokens_per_s": sum(seq_lens) / step_s,
           "achieved_tflops": flops / step_s / 1e12, "loss": float(loss.detach()), "path": trainer.logprob_path,
           "attention": attention,
           **_peak_memory(device)}
    peak = peak_tflops(device)
    if peak:
        out["mfu"] = out["achieved_tflops"] / peak
    if grads_out is not None:
        from safetensors.torch import save_file

        grads = {n: p.grad.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.grad is not None}
        save_file({**grads, "__loss__": loss.detach().float().reshape(1).cpu()}, grads_out)
    return out


CACHE_METHODS = ("bare_forward", "reference", "onepass", "onepass_torch")
# the slow comparison points run once a batch; `repeats` applies to the bare forward and the cache's path
COMPARISON_ONLY = ("reference", "onepass_torch")


@torch.no_grad()
def cache_pass_run(spec: dict[str, Any], shape: tuple[int, int, int], *, device: str, dtype: str,
                   batches: int, topk: int = 50, compiled: bool = False, repeats: int = 1) -> dict[str, Any]:
    """The teacher cache's pass over `batches` synthetic batches, four ways, interleaved batch by batch:

    - ``bare_forward``: the teacher's forward with the LM head run only at the response states (their
      [N, V] logits formed: `scoring.flat_state_logits`), nothing else: the physical limit;
    - ``reference``: the full-logits path (`tvkd.cache.teacher.batch_columns`, method "reference");
    - ``onepass``: the one-pass path (`tvkd.cache.onepass`) as the cache runs it: on a CPU its compiled
      C fold (`tvkd.cache.fold_kernel`) where that builds;
    - ``onepass_torch``: the one-pass path with its pure-torch fold (``TVKD_CACHE_KERNEL=0``; `compiled`:
      through torch.compile), the comparison point of the C fold;

    each with the six Table 5 aux rewards at one temperature and the top-`topk` (values copied to the
    host). Each batch runs the bare forward and ``onepass`` `repeats` times, alternating (the slower
    comparison points once), and each path's time on a batch is its best (machine noise only ever adds
    time). Tokens/s and MFU of each, and each path's
    throughput over the bare forward's."""
    from tvkd.aux_rewards import TABLE5
    from tvkd.cache import teacher as cache
    from tvkd.scoring import collate_pairs, flat_state_logits

    model = random_model(spec, device, getattr(torch, dtype)).eval()
    specs = cache.aux_specs(TABLE5, (2.0,))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pairs, prompt, response = shape
    times: dict[str, list[float]] = {m: [] for m in CACHE_METHODS}
    tokens, flops = 0, 0.0
    previous = {k: os.environ.get(k) for k in ("TVKD_CACHE_COMPILE", "TVKD_CACHE_KERNEL")}
    os.environ["TVKD_CACHE_COMPILE"] = "1" if compiled else "0"

    def run(method: str, b: dict[str, torch.Tensor]) -> None:
        if method == "bare_forward":
            z = flat_state_logits(model, b["input_ids"], b["attention_mask"], b["prompt_lens"], b["resp_lens"])
            _sync(device)
            del z
            return
        os.environ["TVKD_CACHE_KERNEL"] = "0" if method == "onepass_torch" else "1"
        path = "reference" if method == "reference" else "onepass"
        cols, top = cache.batch_columns(model, b, specs, topk, vocab_size=None, pad_id=0, method=path)
        [v.cpu() for v in cols.values()], [x.cpu() for x in top]

    try:
        for i in range(batches + 1):  # the first batch warms up (and compiles)
            b = collate_pairs(synthetic_pairs(pairs, prompt, response, spec["vocab_size"], seed=10 + i,
                                              bos=spec["bos_token_id"], eos=spec["eos_token_id"]), pad_id=0)
            b = {k: v.to(device) for k, v in b.items()}
            best = {m: float("inf") for m in CACHE_METHODS}
            for rep in range(repeats if i else 1):
                order = CACHE_METHODS if (i + rep) % 2 == 0 else CACHE_METHODS[::-1]  # drift hits each alike
                for method in order if rep == 0 else [m for m in order if m not in COMPARISON_ONLY]:
                    _sync(device)
                    t0 = time.perf_counter()
                    run(method, b)
                    _sync(device)
                    best[method] = min(best[method], time.perf_counter() - t0)
            if i:
                for method in CACHE_METHODS:
                    times[method].append(best[method])
            if i:
                seq = b["attention_mask"].sum(1).tolist()
                tokens += int(sum(seq))
                flops += model_flops(spec, seq, int((b["resp_lens"] + 1).sum()), train=False)
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    from tvkd.cache import fold_kernel

    out: dict[str, Any] = {"pairs_per_batch": pairs, "prompt": prompt, "response_max": response, "batches": batches,
                           "repeats": repeats, "aux_columns": len(specs), "topk": topk, "compiled": compiled,
                           "c_fold": device == "cpu" and fold_kernel.available(), **_peak_memory(device)}
    peak = peak_tflops(device)
    for method in CACHE_METHODS:
        total = sum(times[method])
        out[method] = {"seconds": total, "tokens_per_s": tokens / total, "achieved_tflops": flops / total / 1e12}
        if peak:
            out[method]["mfu"] = out[method]["achieved_tflops"] / peak
    for method in CACHE_METHODS[1:]:
        out[f"{method}_over_bare_forward"] = out["bare_forward"]["seconds"] / out[method]["seconds"]
    # the cache itself: the one-pass path
    out.update(tokens_per_s=out["onepass"]["tokens_per_s"], achieved_tflops=out["onepass"]["achieved_tflops"])
    if peak:
        out["mfu"] = out["onepass"]["mfu"]
    return out


def dpo_mix_lengths(pairs: int, median: int, longest: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts with DPO-MIX-7K's long-tailed shape: log-normal lengths
    (σ = 0.8 around `median` for a whole pair), a quarter prompt, clipped to `longest`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(pairs):
        total = float(torch.empty(1).log_normal_(float(torch.tensor(median).log()), 0.8, generator=g))
        total = int(min(max(total, 16), longest))
        prompt = max(2, total // 4)
        chosen = max(2, total - prompt)
        rejected = max(2, int(chosen * float(torch.empty(1).uniform_(0.5, 1.0, generator=g))))
        out.append((prompt, chosen, rejected))
    return out


ORDERS = {"padded": {}, "bucketed": {"length_buckets": True}, "padding_free": {"padding_free": True},
          "bucketed+padding_free": {"length_buckets": True, "padding_free": True}}


def order_run(spec: dict[str, Any], lengths: list[tuple[int, int, int]], batch: int, options: dict[str, Any], *,
              device: str, dtype: str, chunk: int | None, warmup: int) -> dict[str, Any]:
    """Real tokens/s of TVKD steps over every pair of `lengths` once, `batch` pairs a step, in a random
    order (padded batches) or the length-bucketed one (`train.length_buckets`), padded or padding-free."""

    from tvkd.scoring import collate_pairs
    from tvkd.training.sampler import LengthBucketSampler, padding_fraction

    attention = options.get("attention", "sdpa")
    model = random_model(spec, device, getattr(torch, dtype), attention=attention).train()
    g = torch.Generator().manual_seed(5)
    v = spec["vocab_size"]
    rows = [{"prompt_ids": [spec["bos_token_id"]] + torch.randint(0, v, (p - 1,), generator=g).tolist(),
             "chosen_ids": torch.randint(0, v, (c - 1,), generator=g).tolist() + [spec["eos_token_id"]],
             "rejected_ids": torch.randint(0, v, (r - 1,), generator=g).tolist() + [spec["eos_token_id"]]}
            for p, c, r in lengths]
    pair_len = [p + max(c, r) for p, c, r in lengths]
    if options.get("length_buckets"):
        order = list(LengthBucketSampler(pair_len, batch, seed=0))
    else:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[s:s + batch] for s in range(0, len(order), batch)]
    trainer = _tvkd_trainer(model, device, batch, chunk, bool(options.get("padding_free")))
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    seconds, real, padded = 0.0, 0, 0
    for step, idx in enumerate(batches[:warmup] + batches):
        b = collate_pairs([rows[i] for i in idx], pad_id=0)
        b["ref_logps"] = -torch.rand(b["response_ids"].shape, generator=g) * b["response_mask"] * 10
        b["col:tvkd_offset"] = torch.randn(len(idx), generator=g)
        b = {k: x.to(device) for k, x in b.items()}
        _sync(device)
        t0 = time.perf_counter()
        trainer.compute_loss(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            seconds += time.perf_counter() - t0
            real += int(b["attention_mask"].sum())
            padded += int(b["attention_mask"].numel())
    return {"pairs": len(rows), "batch_pairs": batch, "steps": len(batches), "real_tokens": real,
            "padded_tokens": padded, "padding_fraction": padding_fraction(pair_len, order, batch),
            "seconds": seconds, "tokens_per_s": real / seconds, "attention": attention, **_peak_memory(device)}


def _dispatch(job: dict[str, Any]) -> dict[str, Any]:
    if job["kind"] == "train":
        return train_step_run(job["spec"], tuple(job["shape"]), job["options"], device=job["device"],
                              dtype=job["dtype"], chunk=job["chunk"], steps=job["steps"], warmup=job["warmup"],
                              grads_out=job.get("grads_out"))
    if job["kind"] == "order":
        return order_run(job["spec"], [tuple(x) for x in job["lengths"]], job["batch"], job["options"],
                         device=job["device"], dtype=job["dtype"], chunk=job["chunk"], warmup=job["warmup"])
    return cache_pass_run(job["spec"], tuple(job["shape"]), device=job["device"], dtype=job["dtype"],
                          batches=job["batches"], compiled=job.get("compiled", False), repeats=job.get("repeats", 1))


def _worker(spec_json: str) -> None:
    job = json.loads(spec_json)
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    Path(job["out"]).write_text(json.dumps(_dispatch(job)))


def _in_subprocess(job: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run one measurement in a fresh Python process (its own peak memory); its result."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = "import sys; from tvkd.bench.paper import _worker; _worker(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(job)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"bench process failed ({job['kind']} {job.get('name', '')}):\n{proc.stderr[-3000:]}")
    return json.loads(Path(job["out"]).read_text())


def _grad_diffs(base: str, other: str) -> dict[str, float]:
    from safetensors.torch import load_file

    a, b = load_file(base), load_file(other)
    loss = float((a.pop("__loss__") - b.pop("__loss__")).abs().max())
    return {"loss_abs_diff": loss, "grad_max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
            "grad_max_abs": max(float(a[k].abs().max()) for k in a)}


PARTS = ("cache", "order", "train")


def main(device: str = "auto", quick: bool = False, out: str | Path | None = None, rounds: int | None = None,
         threads: int | None = None, configs: list[str] | None = None, shapes_name: str | None = None,
         parts: tuple[str, ...] | list[str] = PARTS) -> int:
    """Run the paper-shape benchmark on `device` ("auto": CUDA when present, else CPU); write JSON to `out`
    (default ``$TVKD_RESULTS/bench-paper-<shapes>.json``).

    `shapes_name`: "cuda" (the real shapes), "cpu" (scaled down, same vocabulary) or "tiny" (a smoke
    test); default: the one for `device`. `parts`: any of "cache" (the teacher cache's pass against
    the bare forward), "order" (padded, length-bucketed and padding-free steps over DPO-MIX-like
    lengths), "train" (the TVKD step's options against the plain step).
    """
    import importlib.util

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch")
    shapes = SHAPES[shapes_name or device]
    options = dict(OPTIONS)
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        # padding-free pays on a GPU with flash-attention's varlen kernels; sdpa attends the whole pack
        options["padding_free+fa2"] = {"padding_free": True, "attention": "flash_attention_2"}
        options["chunked+padding_free+fa2"] = {"logprob_chunk": True, "padding_free": True,
                                               "attention": "flash_attention_2"}
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown bench part(s) {bad}; valid: {', '.join(PARTS)}")
    names = configs or list(options)
    unknown = [n for n in names if n not in options]
    if unknown:
        raise ValueError(f"unknown bench configuration(s) {unknown}; valid: {', '.join(options)}")
    threads = threads or (min(2, os.cpu_count() or 1) if device == "cpu" else None)
    rounds = rounds or (1 if quick or device == "cuda" else 2)
    steps = 1 if quick and device == "cpu" else shapes["steps"]
    results: dict[str, Any] = {"device": device, "shapes": shapes_name or device, "dtype": shapes["dtype"],
                               "chunk": shapes["chunk"],
                               "threads": threads, "rounds": rounds,
                               "student": _describe(shapes["student"]), "teacher": _describe(shapes["teacher"])}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
        results["peak_bf16_tflops"] = peak_tflops(device)
    print(f"tvkd bench --shapes paper on {results.get('gpu', 'CPU')}: student {results['student']}, "
          f"teacher {results['teacher']}, {shapes['dtype']}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run = (lambda job: _in_subprocess(job)) if device == "cpu" else _run_here
        if "cache" in parts:
            cache = {"kind": "cache", "spec": shapes["teacher"], "shape": shapes["cache"], "device": device,
                     "dtype": shapes["dtype"], "batches": 1 if quick else shapes["cache_batches"], "threads": threads,
                     "repeats": 1 if quick else shapes["cache_repeats"],
                     "compiled": os.environ.get("TVKD_CACHE_COMPILE") == "1", "out": str(tmp / "cache.json")}
            results["teacher_cache"] = run(cache)
            _print_cache(shapes["cache"], results["teacher_cache"])
        if "order" in parts:
            results["order"] = _order_part(shapes, options, device, threads, tmp, run)
        if "train" not in parts:
            names = []
        results["train"] = []
        for shape in (shapes["train"][:1] if quick else shapes["train"]) if names else []:
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for r in range(rounds):  # rounds interleave the configurations, so drift hits each alike
                for name in names:
                    job = {"kind": "train", "name": name, "spec": shapes["student"], "shape": shape,
                           "options": options[name], "device": device, "dtype": shapes["dtype"],
                           "chunk": shapes["chunk"], "steps": steps, "warmup": shapes["warmup"], "threads": threads,
                           "out": str(tmp / f"{name}-{r}.json")}
                    if device == "cpu" and r == 0:
                        job["grads_out"] = str(tmp / f"{name}.safetensors")
                    runs[name].append(_in_subprocess(job) if device == "cpu" else _run_here(job))
            rows = _summarise(runs, tmp if device == "cpu" else None)
            results["train"].append({"pairs": shape[0], "tokens_max": shape[1] + shape[2], "configs": rows})
            _print_train(shape, rows)
    from tvkd.bench import bench_output

    out = bench_output(f"bench-paper-{shapes_name or device}.json", out)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0


def _print_cache(shape: tuple[int, int, int], tc: dict[str, Any]) -> None:
    print(f"\nteacher cache ({shape[0]} pairs x (prompt {shape[1]} + response <= {shape[2]}) tokens a batch, "
          f"{tc['aux_columns']} aux columns + top-{tc['topk']}; {tc['batches']} batches, interleaved, "
          f"best of {tc.get('repeats', 1)} each):")
    print(f"  {'path':<36}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'/ bare forward':>16}")
    torch_fold = "cache, one pass, torch fold" + (" (compiled)" if tc.get("compiled") else "")
    labels = {"bare_forward": "bare forward (LM head at responses)", "reference": "cache, full logits (reference)",
              "onepass": "cache, one pass" + (", C fold" if tc.get("c_fold") else ", torch fold (no C compiler)"),
              "onepass_torch": torch_fold}
    for method, label in labels.items():
        r = tc[method]
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        ratio = tc.get(f"{method}_over_bare_forward", 1.0)
        print(f"  {label:<36}{r['tokens_per_s']:>11,.0f}{r['achieved_tflops']:>9.3g}{mfu:>7}{ratio:>16.3f}")
    print(f"  peak memory {tc['peak_memory_gb']:.2f} GB", flush=True)


def _order_part(shapes: dict[str, Any], options: dict[str, Any], device: str, threads: int | None, tmp: Path,
                run: Any) -> dict[str, Any]:
    """Every order configuration (padded, bucketed, padding-free, both; flash-attention varlen when
    installed on a GPU) over the same DPO-MIX-like pairs; tokens/s over the padded step's."""
    o = shapes["order"]
    lengths = dpo_mix_lengths(o["pairs"], o["median"], o["longest"])
    orders = dict(ORDERS)
    if "padding_free+fa2" in options:
        orders["padding_free+fa2"] = {"padding_free": True, "attention": "flash_attention_2"}
        orders["bucketed+padding_free+fa2"] = {"length_buckets": True, "padding_free": True,
                                               "attention": "flash_attention_2"}
    rows = {}
    for name, opts in orders.items():
        rows[name] = run({"kind": "order", "name": name, "spec": shapes["student"], "lengths": lengths,
                          "batch": o["batch"], "options": opts, "device": device, "dtype": shapes["dtype"],
                          "chunk": shapes["chunk"], "warmup": 1, "threads": threads,
                          "out": str(tmp / f"order-{name}.json")})
    base = rows["padded"]["tokens_per_s"]
    print(f"\nTVKD steps over {o['pairs']} DPO-MIX-like pairs (median {o['median']}, at most {o['longest']} tokens), "
          f"{o['batch']} pairs a step, chunked log-probs ({shapes['chunk']}):")
    print(f"  {'order':<28}{'padding':>9}{'tokens/s':>11}{'/ padded':>10}")
    for name, r in rows.items():
        r["tokens_per_s_over_padded"] = r["tokens_per_s"] / base
        pad = 1 - r["real_tokens"] / r["padded_tokens"] if not ORDERS.get(name, {}).get("padding_free") else 0.0
        print(f"  {name:<28}{pad:>9.1%}{r['tokens_per_s']:>11,.0f}{r['tokens_per_s_over_padded']:>10.3f}", flush=True)
    return {"pairs": o["pairs"], "median": o["median"], "longest": o["longest"], "batch_pairs": o["batch"],
            "configs": rows}


def _run_here(job: dict[str, Any]) -> dict[str, Any]:
    """On a GPU every measurement runs in this process (peak memory is reset per measurement)."""
    res = _dispatch({**job, "grads_out": None})
    if job["device"] == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return res


def _describe(spec: dict[str, Any]) -> str:
    return (f"Llama {spec['num_hidden_layers']}x{spec['hidden_size']} (ffn {spec['intermediate_size']}, "
            f"{spec['num_attention_heads']}/{spec['num_key_value_heads']} heads, vocab {spec['vocab_size']:,})")


def _summarise(runs: dict[str, list[dict[str, Any]]], tmp: Path | None) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, rs in runs.items():
        row = dict(rs[0])
        row["step_s"] = statistics.median(r["step_s"] for r in rs)
        row["tokens_per_s"] = row["tokens"] / row["step_s"]
        row["achieved_tflops"] = statistics.median(r["achieved_tflops"] for r in rs)
        row["peak_memory_gb"] = max(r["peak_memory_gb"] for r in rs)
        if "mfu" in rs[0]:
            row["mfu"] = statistics.median(r["mfu"] for r in rs)
        rows[name] = row
    if "plain" in rows:
        base = rows["plain"]
        for name, row in rows.items():
            row["step_over_plain"] = row["step_s"] / base["step_s"]
            row["memory_over_plain"] = row["peak_memory_gb"] / base["peak_memory_gb"]
            if tmp is not None and name != "plain" and (tmp / "plain.safetensors").exists():
                row.update(_grad_diffs(str(tmp / "plain.safetensors"), str(tmp / f"{name}.safetensors")))
    return rows


def _print_train(shape: tuple[int, int, int], rows: dict[str, Any]) -> None:
    print(f"\nTVKD training step, {shape[0]} pairs x (prompt {shape[1]} + response <= {shape[2]}) tokens:")
    print(f"  {'configuration':<22}{'step s':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}"
          f"{'x time':>8}{'x mem':>7}{'|dloss|':>9}{'|dgrad|':>9}")
    for name, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        dl = f"{r['loss_abs_diff']:.1e}" if "loss_abs_diff" in r else "-"
        dg = f"{r['grad_max_abs_diff']:.1e}" if "grad_max_abs_diff" in r else "-"
        print(f"  {name:<22}{r['step_s']:>9.3f}{r['tokens_per_s']:>11,.0f}{r['achieved_tflops']:>9.3g}{mfu:>7}"
              f"{r['peak_memory_gb']:>9.2f}{r.get('step_over_plain', 1):>8.3f}{r.get('memory_over_plain', 1):>7.3f}"
              f"{dl:>9}{dg:>9}", flush=True)
