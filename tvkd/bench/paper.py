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
CPU_TEACHER = {**LLAMA_3_1_8B, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 2,
               "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}

# Synthetic batches: pairs x (prompt + response <= total) tokens; response lengths drawn in
# [resp/2, resp] per row, so a batch has the padding real data has.
SHAPES = {
    "cuda": {"student": LLAMA_3_2_1B, "teacher": LLAMA_3_1_8B, "dtype": "bfloat16", "chunk": 1024,
             "train": [(4, 256, 768), (4, 512, 1536)], "cache": (8, 256, 768),
             "steps": 6, "warmup": 2, "cache_batches": 6},
    "cpu": {"student": CPU_STUDENT, "teacher": CPU_TEACHER, "dtype": "float32", "chunk": 256,
            "train": [(4, 64, 448)], "cache": (4, 64, 448), "steps": 2, "warmup": 1, "cache_batches": 2},
    # a smoke test of this benchmark's own logic (tests, `tests/gpu_paper_shapes.sh --dry-run`)
    "tiny": {"student": {**CPU_STUDENT, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "bos_token_id": 1,
                         "eos_token_id": 2},
             "teacher": {**CPU_TEACHER, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "bos_token_id": 1,
                         "eos_token_id": 2},
             "dtype": "float32", "chunk": 16, "train": [(2, 8, 24)], "cache": (2, 8, 24), "steps": 1, "warmup": 1,
             "cache_batches": 1},
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


def train_step_run(spec: dict[str, Any], shape: tuple[int, int, int], options: dict[str, Any], *, device: str,
                   dtype: str, chunk: int, steps: int, warmup: int, grads_out: str | None = None) -> dict[str, Any]:
    """Median TVKD step (forward, loss, backward, AdamW) of a random `spec` model on one synthetic batch.

    The steps repeat one batch at learning rate 0, so every configuration computes the same numbers
    at every step (the optimizer's work is the same at any rate); `grads_out` (a safetensors file)
    receives the last step's loss and parameter gradients, read after the memory peak is taken.
    """
    from transformers import TrainingArguments

    from tvkd.losses import LOSSES, build_config
    from tvkd.scoring import collate_pairs
    from tvkd.training.trainer import PreferenceCollator, PreferenceTrainer

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
    loss_cls = LOSSES.get("tvkd")
    cfg = build_config(loss_cls, {"aux": "soft_value"})
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, use_cpu=device == "cpu", report_to="none",
                                 remove_unused_columns=False, per_device_train_batch_size=pairs)
        trainer = PreferenceTrainer(model=model, args=args, train_dataset=[{}],
                                    data_collator=PreferenceCollator(0, {"tvkd_offset": "pair"}, True),
                                    loss=loss_cls(), loss_config=cfg,
                                    logprob_chunk=chunk if options.get("logprob_chunk") else None,
                                    padding_free=bool(options.get("padding_free")))
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


@torch.no_grad()
def cache_pass_run(spec: dict[str, Any], shape: tuple[int, int, int], *, device: str, dtype: str,
                   batches: int) -> dict[str, Any]:
    """The teacher cache's pass (logits at every state s_0..s_T, the six Table 5 aux rewards at one
    temperature, the values copied to the host) over `batches` synthetic batches; tokens/s and MFU."""
    from tvkd.aux_rewards import TABLE5, compute_aux
    from tvkd.cache.teacher import aux_specs
    from tvkd.scoring import collate_pairs, flat_state_logits

    model = random_model(spec, device, getattr(torch, dtype)).eval()
    specs = aux_specs(TABLE5, (2.0,))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pairs, prompt, response = shape
    times, tokens, flops = [], 0, 0.0
    for i in range(batches + 1):  # the first batch warms up
        b = collate_pairs(synthetic_pairs(pairs, prompt, response, spec["vocab_size"], seed=10 + i,
                                           bos=spec["bos_token_id"], eos=spec["eos_token_id"]), pad_id=0)
        b = {k: v.to(device) for k, v in b.items()}
        _sync(device)
        t0 = time.perf_counter()
        z = flat_state_logits(model, b["input_ids"], b["attention_mask"], b["prompt_lens"], b["resp_lens"])
        nxt = torch.cat([torch.cat([ids[: int(k)], ids.new_zeros(1)]) for ids, k in zip(b["response_ids"], b["resp_lens"])])
        vals = compute_aux(z, nxt, specs)
        host = {k: v.cpu() for k, v in vals.items()}
        _sync(device)
        del z, vals, host
        if i:
            times.append(time.perf_counter() - t0)
            seq = b["attention_mask"].sum(1).tolist()
            tokens += int(sum(seq))
            flops += model_flops(spec, seq, int((b["resp_lens"] + 1).sum()), train=False)
    total = sum(times)
    out = {"pairs_per_batch": pairs, "prompt": prompt, "response_max": response, "batches": batches,
           "tokens_per_s": tokens / total, "achieved_tflops": flops / total / 1e12, **_peak_memory(device)}
    peak = peak_tflops(device)
    if peak:
        out["mfu"] = out["achieved_tflops"] / peak
    return out


def _worker(spec_json: str) -> None:
    job = json.loads(spec_json)
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    if job["kind"] == "train":
        res = train_step_run(job["spec"], tuple(job["shape"]), job["options"], device=job["device"],
                             dtype=job["dtype"], chunk=job["chunk"], steps=job["steps"], warmup=job["warmup"],
                             grads_out=job.get("grads_out"))
    else:
        res = cache_pass_run(job["spec"], tuple(job["shape"]), device=job["device"], dtype=job["dtype"],
                             batches=job["batches"])
    Path(job["out"]).write_text(json.dumps(res))


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


def main(device: str = "auto", quick: bool = False, out: str | Path | None = None, rounds: int | None = None,
         threads: int | None = None, configs: list[str] | None = None, shapes_name: str | None = None) -> int:
    """Run the paper-shape benchmark on `device` ("auto": CUDA when present, else CPU); write JSON to `out`.

    `shapes_name`: "cuda" (the real shapes), "cpu" (scaled down, same vocabulary) or "tiny" (a smoke
    test); default: the one for `device`.
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
        cache = {"kind": "cache", "spec": shapes["teacher"], "shape": shapes["cache"], "device": device,
                 "dtype": shapes["dtype"], "batches": 1 if quick else shapes["cache_batches"], "threads": threads,
                 "out": str(tmp / "cache.json")}
        results["teacher_cache"] = _in_subprocess(cache) if device == "cpu" else _run_here(cache)
        tc = results["teacher_cache"]
        print(f"teacher cache ({shapes['cache'][0]} pairs x {sum(shapes['cache'][1:])} tokens): "
              f"{tc['tokens_per_s']:,.0f} tokens/s, {tc['achieved_tflops']:.3g} TFLOP/s"
              + (f", MFU {tc['mfu']:.1%}" if "mfu" in tc else "") + f", peak {tc['peak_memory_gb']:.2f} GB", flush=True)
        results["train"] = []
        for shape in shapes["train"][:1] if quick else shapes["train"]:
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


def _run_here(job: dict[str, Any]) -> dict[str, Any]:
    """On a GPU every measurement runs in this process (peak memory is reset per measurement)."""
    if job["kind"] == "train":
        res = train_step_run(job["spec"], tuple(job["shape"]), job["options"], device=job["device"],
                             dtype=job["dtype"], chunk=job["chunk"], steps=job["steps"], warmup=job["warmup"])
    else:
        res = cache_pass_run(job["spec"], tuple(job["shape"]), device=job["device"], dtype=job["dtype"],
                             batches=job["batches"])
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
