"""`tvkd bench`: the project's speed and memory targets, as ratios measured in one process.

1. TVKD step / DPO step on the same trainer (target <= 1.03);
2. this trainer's DPO throughput / TRL DPOTrainer's on the same model, batch and length (>= 1.5);
3. teacher-cache bytes per response token (six aux rewards at one temperature + reference
   log-probs, fp32) against a top-50 cache of the same data (target <= 32 bytes; top-50 ~300+);
4. cache build throughput / a bare no-grad teacher forward over the same batches (>= 0.85).

With ``ddp=True`` (`ddp_step_ratio`), also: a 2-process CPU DDP step (gloo) against a 1-process
step at the same global batch and the same number of threads in all (no target; reported).

Both sides of a ratio run in this process on the same synthetic data, interleaved where that
matters, so machine noise hits both alike. Timings are medians over steps after a warm-up.
The model is a small random Llama with a realistic vocabulary (the cache's cost grows with V).
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

TARGETS = {
    "tvkd_step_over_dpo_step": ("<=", 1.03),
    "dpo_throughput_over_trl": (">=", 1.5),
    "cache_bytes_per_token": ("<=", 32.0),
    "cache_build_over_bare_forward": (">=", 0.85),
}


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eot>", "<user>", "<assistant>"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eot>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' <eot> ' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}")
    return fast


def _model(vocab: int, hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0,
                      bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _rows(n: int, vocab: int, prompt_len: int, resp_len: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)

    def text(k: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, vocab - 6, size=k))

    return [
        {"prompt": [{"role": "user", "content": text(prompt_len)}],
         "chosen": [{"role": "assistant", "content": text(int(rng.integers(resp_len // 2, resp_len)))}],
         "rejected": [{"role": "assistant", "content": text(int(rng.integers(resp_len // 2, resp_len)))}]}
        for _ in range(n)
    ]


class _StepTimer:
    """A transformers callback recording each optimizer step's wall time."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self._t = 0.0

            def on_step_begin(self, args, state, control, **kw):
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.times.append(time.perf_counter() - self._t)

        return Timer()


def _examples(rows):
    from tvkd.data import PreferenceExample

    return [PreferenceExample(id=str(i), prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], meta={})
            for i, r in enumerate(rows)]


# Options that keep the one-time stages of some losses short on the bench model (rollouts, contrast
# models): the step time, which is what is measured, does not depend on them.
BENCH_OPTIONS = {"seqkd": {"max_new_tokens": 16}, "adpa": {"max_new_tokens": 16}, "gkd": {"max_new_tokens": 16},
                 "tis_dpo": {"contrast_epochs": 0.25}, "tvkd": {"aux": "soft_value"}}


_TREF: dict[int, Any] = {}


def _reference_teacher(model):
    """Another random model of the same shape, as the teacher's SFT model (so teacher-reward gaps are not 0)."""
    if id(model) not in _TREF:
        cfg = model.config
        _TREF[id(model)] = _model(cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, seed=1).eval()
    return _TREF[id(model)]


def _ours(model, tok, rows, loss_name: str, steps: int, batch: int, tmp: Path):
    """Per-step times of PreferenceTrainer with a registered loss, on the pipeline's own training set."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from tvkd.api import LOSSES, build_config
    from tvkd.assemble import CacheOptions, assemble_training_set
    from tvkd.modeling import ModelSource
    from tvkd.tokenize import TokenizeConfig, tokenize_preferences
    from tvkd.training.trainer import PreferenceCollator, PreferenceTrainer

    td = tokenize_preferences(_examples(rows), tok, TokenizeConfig(1024, 512), cache_dir=tmp / "tok", progress=False)
    loss_cls = LOSSES.get(loss_name)
    loss = loss_cls()
    cfg = build_config(loss_cls, BENCH_OPTIONS.get(loss_name, {}))
    teacher = ModelSource.in_memory(model, "bench-teacher")
    ts = assemble_training_set(td, loss, cfg, reference=ModelSource.in_memory(model, "bench-ref"), teacher=teacher,
                               teacher_reference=ModelSource.in_memory(_reference_teacher(model), "bench-tref"),
                               student=ModelSource.in_memory(model, "bench-student"), pad_id=tok.pad_token_id,
                               eos_id=tok.eos_token_id, cache=CacheOptions(cache_dir=str(tmp / "caches")),
                               progress=False)
    args = TrainingArguments(output_dir=str(tmp / f"out-{loss_name}"), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=1e-5, use_cpu=True, report_to="none", remove_unused_columns=False,
                             save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0, data_seed=0,
                             ddp_find_unused_parameters=False)  # as `train_policy` (matters only under DDP)
    timer = _StepTimer()
    collator = PreferenceCollator(tok.pad_token_id, loss.batch_columns(cfg), ts.needs.reference)
    online = {}
    if ts.needs.reference_logits:
        online["reference_model"] = copy.deepcopy(model)
    if ts.needs.teacher_logits:
        online["teacher_model"] = copy.deepcopy(model)
    if ts.needs.on_policy is not None:
        online.update(on_policy=ts.needs.on_policy, eos_id=tok.eos_token_id)
    trainer = PreferenceTrainer(model=copy.deepcopy(model).train(), args=args, train_dataset=ts.train,
                                data_collator=collator, loss=loss, loss_config=cfg, callbacks=[timer],
                                needs_student_logits=ts.needs.student_logits, **online)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return timer.times


def _trl(model, tok, rows, steps: int, batch: int, tmp: Path):
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp / "trl"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-5,
                     use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                     logging_steps=10_000, disable_tqdm=True, precompute_ref_log_probs=True, max_length=1024, seed=0,
                     data_seed=0, beta=0.1)
    timer = _StepTimer()
    trainer = DPOTrainer(model=copy.deepcopy(model).train(), ref_model=copy.deepcopy(model).eval(), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return timer.times


def _median_after_warmup(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:] if len(times) > warmup + 2 else times)


@torch.no_grad()
def _cache_vs_forward(model, tok, rows, tmp: Path, repeats: int):
    from tvkd.aux_rewards import TABLE5
    from tvkd.cache.teacher import (
        arrow_bytes,
        aux_specs,
        build_reference_cache,
        build_teacher_cache,
        length_batches,
        response_tokens,
    )
    from tvkd.scoring import collate_pairs
    from tvkd.tokenize import TokenizeConfig, tokenize_preferences

    td = tokenize_preferences(_examples(rows), tok, TokenizeConfig(1024, 512), cache_dir=tmp / "tok", progress=False)
    model = model.eval()
    specs = aux_specs(TABLE5, (2.0,))  # the six aux rewards of Table 5 at one temperature
    cache_s, fwd_s = [], []
    for r in range(repeats):  # interleaved, so drift hits both
        t0 = time.perf_counter()
        tc = build_teacher_cache(td.dataset, td.fingerprint, model, f"bench-{r}", specs, cache_dir=tmp / f"tc{r}",
                                 progress=False, batch_size=16)
        cache_s.append(time.perf_counter() - t0)
        cols = td.dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        t0 = time.perf_counter()
        for idx in length_batches(cols, 16, 65536):
            f = cols[idx]
            feats = [dict(prompt_ids=p, chosen_ids=c, rejected_ids=rj)
                     for p, c, rj in zip(f["prompt_ids"], f["chosen_ids"], f["rejected_ids"])]
            b = collate_pairs(feats, tok.pad_token_id)
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        fwd_s.append(time.perf_counter() - t0)
    ref = build_reference_cache(td.dataset, td.fingerprint, model, "bench-ref", cache_dir=tmp / "ref", progress=False)
    top = build_teacher_cache(td.dataset, td.fingerprint, model, "bench-top", [], topk=50,
                              cache_dir=tmp / "top", progress=False, batch_size=16)
    ntok = response_tokens(td.dataset)
    top_bytes = arrow_bytes(top.dataset) / ntok
    return {
        "cache_seconds": statistics.median(cache_s),
        "forward_seconds": statistics.median(fwd_s),
        "aux_bytes_per_token": tc.stats["aux_bytes_per_token"],
        "ref_bytes_per_token": ref.stats["bytes_per_token"],
        "top50_bytes_per_token": top_bytes,
        "response_tokens": ntok,
    }


def _per_loss(model, tok, rows, steps: int, batch: int, tmp: Path, warm: int) -> dict[str, float]:
    """Median step time of every registered loss over the DPO step, on the same batches (one run each)."""
    from tvkd.api import LOSSES

    names = ["dpo"] + sorted(n for n in LOSSES.names() if n != "dpo")
    times = {}
    for name in names:
        times[name] = _median_after_warmup(_ours(model, tok, rows, name, steps, batch, tmp / f"loss-{name}"), warm)
        print(f"  {name:<14} {times[name]:.4f} s/step", flush=True)
    return {name: t / times["dpo"] for name, t in times.items()}


def _ddp_worker(spec_json: str) -> None:
    """One process of `ddp_step_ratio`: this trainer's steps on the bench model; writes its step times.

    Started with the launch variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT) set, so the Trainer joins
    DDP (gloo) exactly as a `tvkd run` under `accelerate launch` / torchrun does; or without them.
    """
    import os

    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec["threads"]))
    vocab, hidden, layers = spec["model"]
    tok = _tokenizer(vocab)
    model = _model(vocab, hidden, layers)
    rows = _rows(spec["steps"] * spec["global_batch"] + 16, vocab, prompt_len=48, resp_len=96)
    times = _ours(model, tok, rows, spec["loss"], spec["steps"], spec["per_device"], Path(spec["tmp"]))
    rank = int(os.environ.get("RANK", "0"))
    Path(spec["out"]).joinpath(f"times-rank{rank}.json").write_text(json.dumps(times))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _spawn(spec: dict[str, Any], processes: int, timeout: float) -> list[float]:
    """Run `_ddp_worker` in `processes` fresh CPU processes; the per-step times (the slowest process's)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "CUDA_VISIBLE_DEVICES": "",
            "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        base.pop(var, None)
    procs = []
    for rank in range(processes):
        env = dict(base)
        if processes > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                       LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        code = "import sys; from tvkd.bench.targets import _ddp_worker; _ddp_worker(sys.argv[1])"
        with open(out / f"log-rank{rank}.txt", "w") as log_file:
            procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], env=env,
                                          stdout=log_file, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) or any(p.returncode for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                rank = failed[0] if failed else 0
                tail = (out / f"log-rank{rank}.txt").read_text()[-2000:]
                raise RuntimeError(f"bench process {rank} {'failed' if failed else 'timed out'}:\n{tail}")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    per_rank = [json.loads((out / f"times-rank{r}.json").read_text()) for r in range(processes)]
    return [max(ts) for ts in zip(*per_rank)]


def ddp_step_ratio(quick: bool = False, processes: int = 2, threads: int | None = None, loss: str = "dpo",
                   global_batch: int = 8) -> dict[str, Any]:
    """Median optimizer-step time of `processes` CPU processes (DDP, gloo) at ``global_batch / processes``
    pairs each, over one process at `global_batch` pairs: the same global batch, model and data.

    Both sides use `threads` CPU threads in all (default: 2, as `main`): the DDP processes
    ``threads // processes`` each, the single process all of them. Each side runs in fresh
    processes started like a launcher starts them; the sides alternate (two rounds, one if `quick`).
    A ratio below 1 means the split step is faster. Returns the medians and the ratio.
    """
    import os

    if global_batch % processes:
        raise ValueError(f"global_batch {global_batch} must divide among {processes} processes")
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    threads = threads or min(2, available)
    per_proc = max(1, threads // processes)
    steps, rounds, warm = (10, 1, 2) if quick else (20, 2, 3)
    model = (8192, 256, 4)  # the bench model of `main`
    ddp_t: list[float] = []
    one_t: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            common = {"model": model, "steps": steps, "global_batch": global_batch, "loss": loss,
                      "tmp": str(Path(d) / "work")}
            ddp_t += _spawn({**common, "threads": per_proc, "per_device": global_batch // processes,
                             "out": str(Path(d) / f"ddp{r}")}, processes, timeout=1800)[warm:]
            one_t += _spawn({**common, "threads": per_proc * processes, "per_device": global_batch,
                             "out": str(Path(d) / f"one{r}")}, 1, timeout=1800)[warm:]
    res = {"processes": processes, "global_batch_pairs": global_batch, "threads_total": per_proc * processes,
           "loss": loss, "steps": steps, "rounds": rounds,
           "ddp_step_s": statistics.median(ddp_t), "single_step_s": statistics.median(one_t)}
    res["ddp_step_over_single"] = res["ddp_step_s"] / res["single_step_s"]
    print(f"DDP step ({processes} CPU processes x {global_batch // processes} pairs, {per_proc} thread(s) each) / "
          f"1-process step ({global_batch} pairs, {per_proc * processes} threads), {loss}: "
          f"{res['ddp_step_s']:.4f} / {res['single_step_s']:.4f} s = {res['ddp_step_over_single']:.3f}", flush=True)
    return res


def main(quick: bool = False, out: str | Path | None = None, per_loss: bool = True, ddp: bool = False) -> int:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    vocab, hidden, layers = 8192, 256, 4
    steps, batch = (12, 8) if quick else (30, 8)
    tok = _tokenizer(vocab)
    model = _model(vocab, hidden, layers)
    rows = _rows(steps * batch + 16, vocab, prompt_len=48, resp_len=96)
    results: dict[str, Any] = {"model": {"vocab": vocab, "hidden": hidden, "layers": layers},
                               "batch_pairs": batch, "steps": steps, "threads": torch.get_num_threads()}
    print(f"tvkd bench: Llama {layers}x{hidden}, vocab {vocab}, {batch} pairs/step, prompt 48 + response <=96 tokens, "
          f"{torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        warm = 3
        dpo_t, tvkd_t = [], []
        for rep in range(2):  # interleave DPO and TVKD runs
            dpo_t += _ours(model, tok, rows, "dpo", steps, batch, tmp / f"d{rep}")[warm:]
            tvkd_t += _ours(model, tok, rows, "tvkd", steps, batch, tmp / f"t{rep}")[warm:]
        trl_t = _trl(model, tok, rows, steps, batch, tmp)[warm:]
        dpo_t2 = _ours(model, tok, rows, "dpo", steps, batch, tmp / "d2")[warm:]
        dpo_med, tvkd_med = statistics.median(dpo_t + dpo_t2), statistics.median(tvkd_t)
        trl_med = statistics.median(trl_t)
        results.update(dpo_step_s=dpo_med, tvkd_step_s=tvkd_med, trl_step_s=trl_med)
        results["tvkd_step_over_dpo_step"] = tvkd_med / dpo_med
        results["dpo_throughput_over_trl"] = trl_med / dpo_med
        c = _cache_vs_forward(model, tok, _rows(128, vocab, 48, 96, seed=1), tmp / "cache", repeats=2 if quick else 3)
        results.update(c)
        results["cache_bytes_per_token"] = c["aux_bytes_per_token"] + c["ref_bytes_per_token"]
        results["cache_bytes_over_top50"] = results["cache_bytes_per_token"] / c["top50_bytes_per_token"]
        results["cache_build_over_bare_forward"] = c["forward_seconds"] / c["cache_seconds"]
        if per_loss:
            print("\nper-loss step time (one run each, median after warm-up; the ratio is against dpo):", flush=True)
            results["step_over_dpo"] = _per_loss(model, tok, rows, 8 if quick else 12, batch, tmp / "losses", 2)
    print()
    print(f"{'measure':<34}{'value':>10}  target   {'':<6}")
    for key, (op, target) in TARGETS.items():
        v = results[key]
        ok = v <= target if op == "<=" else v >= target
        print(f"{key:<34}{v:>10.3f}  {op} {target:<6} {'ok' if ok else 'MISS'}")
    print(f"{'(top-50 cache bytes per token)':<34}{results['top50_bytes_per_token']:>10.1f}")
    print(f"{'(step seconds: dpo / tvkd / trl)':<34} {dpo_med:.4f} / {tvkd_med:.4f} / {trl_med:.4f}")
    print(f"{'(cache build / bare forward s)':<34} {c['cache_seconds']:.3f} / {c['forward_seconds']:.3f}")
    if "step_over_dpo" in results:
        print("\nstep time over the DPO step, per loss (what each method costs per step; one-time stages "
              "such as rollouts and contrast models excluded):")
        for name, ratio in sorted(results["step_over_dpo"].items(), key=lambda kv: kv[1]):
            print(f"  {name:<14} {ratio:6.2f}")
    if ddp:
        print("\nmulti-process training (DDP on CPU, gloo) against one process at the same global batch:", flush=True)
        results["ddp"] = ddp_step_ratio(quick=quick)
    from tvkd.bench import bench_output

    out = bench_output("bench.json", out)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0
