"""CUDA check: the teacher cache and bf16 training on a GPU, against fp32 on the same data.

    python tests/gpu_check.py --teacher T_DIR --student S_DIR --data pairs.jsonl [--out DIR]

Prints (and writes gpu_check.json): the cache in bf16 and fp32 on the GPU vs fp32 on the CPU
(max abs difference per aux column, agreement of the soft_value pair-offset signs), cache bytes
per token and build time, and a few bf16 TVKD and DPO training steps (finite losses, median
step time). Not collected by pytest (no test_ prefix): CI machines have no GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from tvkd.api import LOSSES, build_config
    from tvkd.assemble import CacheOptions, assemble_training_set
    from tvkd.aux_rewards import TABLE5
    from tvkd.cache.teacher import aux_specs, build_teacher_cache
    from tvkd.data import load_preferences
    from tvkd.modeling import ModelSource, load_causal_lm, load_tokenizer
    from tvkd.shaping import pair_offset_rows
    from tvkd.tokenize import TokenizeConfig, tokenize_preferences
    from tvkd.training.trainer import PreferenceCollator, PreferenceTrainer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"}
    print(json.dumps(report), flush=True)
    tok = load_tokenizer(args.student)
    exs = load_preferences(args.data, limit=args.pairs).examples
    tmp = Path(tempfile.mkdtemp())
    td = tokenize_preferences(exs, tok, TokenizeConfig(96, 48), cache_dir=tmp / "tok", progress=False)
    specs = aux_specs(TABLE5, (1.0, 2.0))
    caches = {}
    for name, device, dtype in (("cpu_fp32", "cpu", "float32"), (f"{dev}_fp32", dev, "float32"),
                                (f"{dev}_bf16", dev, "bfloat16")):
        teacher = load_causal_lm(args.teacher, dtype=dtype, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tc = build_teacher_cache(td.dataset, td.fingerprint, teacher, name, specs, topk=16, pad_id=tok.pad_token_id,
                                 cache_dir=tmp / name, progress=False, batch_size=64)
        caches[name] = (tc, time.perf_counter() - t0)
        report[f"cache_{name}_seconds"] = round(caches[name][1], 3)
        report[f"cache_{name}_bytes_per_token"] = round(tc.stats["bytes_per_token"], 2)
    cols = {name: tc.dataset for name, (tc, _) in caches.items()}
    base = cols["cpu_fp32"]
    for name in list(cols)[1:]:
        diffs = {}
        for s in specs:
            a = np.concatenate([np.asarray(x) for x in base[f"chosen/{s.column}"]])
            b = np.concatenate([np.asarray(x) for x in cols[name][f"chosen/{s.column}"]])
            diffs[s.column] = float(np.abs(a - b).max())
        report[f"max_abs_diff_{name}_vs_cpu_fp32"] = diffs
        o_ref = np.sign(pair_offset_rows(base["chosen/soft_value@2"], base["rejected/soft_value@2"], "state"))
        o = np.sign(pair_offset_rows(cols[name]["chosen/soft_value@2"], cols[name]["rejected/soft_value@2"], "state"))
        report[f"offset_sign_agreement_{name}"] = float((o == o_ref).mean())
    print(json.dumps({k: v for k, v in report.items() if "diff" in k or "agree" in k}, indent=1), flush=True)

    student = load_causal_lm(args.student, dtype="float32", device=dev)
    teacher = ModelSource.in_memory(load_causal_lm(args.teacher, dtype="bfloat16", device=dev), f"{dev}_bf16")

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.times = 0.0, []

        def on_step_begin(self, *a, **k):
            if dev == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if dev == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

    for loss_name, opts in (("dpo", {}), ("tvkd", {"aux": "soft_value"}), ("dpo", {}), ("tvkd", {"aux": "soft_value"})):
        loss_cls = LOSSES.get(loss_name)
        cfg = build_config(loss_cls, opts)
        loss = loss_cls()
        ts = assemble_training_set(td, loss, cfg, reference=ModelSource.in_memory(student, "ref"), teacher=teacher,
                                   pad_id=tok.pad_token_id, cache=CacheOptions(cache_dir=str(tmp / "train")),
                                   progress=False)
        ds, needs = ts.train, ts.needs
        targs = TrainingArguments(output_dir=str(tmp / f"out-{loss_name}"), max_steps=args.steps,
                                  per_device_train_batch_size=32, learning_rate=3e-5, bf16=dev == "cuda",
                                  use_cpu=dev == "cpu", report_to="none", remove_unused_columns=False,
                                  save_strategy="no", logging_steps=10, disable_tqdm=True, seed=0)
        timer = Timer()
        trainer = PreferenceTrainer(model=copy.deepcopy(student).train(), args=targs, train_dataset=ds,
                                    data_collator=PreferenceCollator(tok.pad_token_id, loss.batch_columns(cfg),
                                                                     needs.reference),
                                    loss=loss, loss_config=cfg, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        res = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        key = f"train_{loss_name}"
        report.setdefault(key, []).append({
            "median_step_s": round(statistics.median(timer.times[5:]), 5),
            "losses": [round(float(x), 4) for x in losses],
            "finite": bool(all(np.isfinite(losses))),
            "train_loss": round(float(res.training_loss), 4),
        })
    d = [r["median_step_s"] for r in report["train_dpo"]]
    t = [r["median_step_s"] for r in report["train_tvkd"]]
    report["tvkd_step_over_dpo_step"] = round(statistics.median(t) / statistics.median(d), 3)
    print(json.dumps(report, indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
