#!/usr/bin/env bash
# One-shot GPU check (about 5 minutes on one H100/H200), run from the repository root:
#
#   bash tests/gpu_paper_shapes.sh            # on the GPU machine; results in $OUT (default ./gpu-out)
#   bash tests/gpu_paper_shapes.sh --dry-run  # the same steps on this CPU with tiny shapes (checks the script)
#
# 1. installs the package without touching the machine's torch (a constraints file pins the torch
#    that is there); offline machines: wheels put in .whl/ beforehand are installed first (see below);
# 2. tests/gpu_check.py: the teacher cache in bf16 and fp32 on CUDA against fp32 on the CPU, and a
#    few bf16 DPO / TVKD training steps on the testbed (its models and data from $TVKD_CACHE, default
#    .gpu-carry/cache, built there if absent);
# 3. `tvkd bench --shapes paper`: random-weight Llama-3.1-8B teacher cache (tokens/s, MFU; the
#    one-pass and the full-logits path against the bare forward), Llama-3.2-1B TVKD steps over
#    DPO-MIX-like lengths (padded, length-bucketed, padding-free; flash-attention varlen when
#    installed) and the TVKD training step (tokens/s, MFU, peak memory) with and without chunked
#    log-probs and padding-free batches, at 4 pairs x 1,024 and 4 pairs x 2,048 tokens;
# 4. prints one compact summary; writes gpu_check.json, bench-paper.json, summary.json and the
#    full log under $OUT.
#
# For a machine with no package index: on a networked machine of the same Python, from the repo
# root, `bash tests/gpu_paper_shapes.sh --fetch-wheels` downloads the wheels the image lacks into
# .whl/, and the testbed can be copied in: `mkdir -p .gpu-carry/cache && cp -r $TVKD_CACHE/testbed
# .gpu-carry/cache/` (both folders are ignored by git locally through .git/info/exclude).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
export TVKD_CACHE=${TVKD_CACHE:-$PWD/.gpu-carry/cache}
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fetch-wheels)
    # Packages the GPU image lacks (its KINDS list has torch, transformers, accelerate, peft, pyarrow,
    # pandas, safetensors, tokenizers...), for CPython 3.12 manylinux x86-64.
    mkdir -p .whl
    for spec in "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "trl==1.16.0"; do
      $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec" || echo "could not fetch $spec"
    done
    ls -la .whl; exit 0 ;;
  "") ;;
  *) echo "error: unknown option $1 (use --dry-run or --fetch-wheels)"; exit 2 ;;
esac
LOG="$OUT/log.txt"
exec > >(tee "$LOG") 2>&1
T0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - T0 ))s: $*"; }

stamp "install ($MODE)"
if [ "$MODE" = gpu ]; then
  CONSTRAINTS=$(mktemp)
  $PY -c 'import torch; print("torch==" + torch.__version__)' > "$CONSTRAINTS"
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl -c "$CONSTRAINTS" || echo "wheels: some failed"
    # transformers' Trainer imports datasets whenever it is installed: one that cannot import (its pyarrow
    # too old here, say) would stop everything, so it goes again and only the GPU checks are lost
    $PY -c "import datasets, trl" 2>/dev/null || { echo "datasets/trl do not import here: removed"; \
      $PY -m pip uninstall -q -y datasets trl; }
  fi
  # offline first (every dependency already there), then from an index, then the package alone
  timeout 120 $PY -m pip install -q --no-index --no-build-isolation -e . -c "$CONSTRAINTS" 2>/dev/null \
    || timeout 240 $PY -m pip install -q --retries 0 --timeout 10 -e . -c "$CONSTRAINTS" \
    || timeout 120 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "install failed: running from the source tree"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
$PY - <<'EOF'
import importlib, torch
mods = ["transformers", "accelerate", "datasets", "trl", "peft", "safetensors", "vllm", "flash_attn"]
have = {}
for m in mods:
    try:
        have[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:  # noqa: BLE001 - report, do not stop
        have[m] = f"missing ({type(e).__name__})"
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), have)
EOF

GPU_CHECK_RC=skipped
stamp "testbed for the GPU checks"
PATHS=$(timeout 200 $PY - <<'EOF'
from tvkd.pipeline import resolve
print(resolve("testbed:teacher_dpo", progress=False), resolve("testbed:student_sft", progress=False),
      resolve("testbed:student_pref_train", progress=False))
EOF
)
if [ -n "$PATHS" ]; then
  read -r TEACHER STUDENT DATA <<< "$PATHS"
  if [ "$MODE" = dry ]; then ARGS=(--pairs 32 --steps 7); else ARGS=(--pairs 512 --steps 40); fi
  stamp "tests/gpu_check.py (cache bf16/fp32 vs CPU fp32; bf16 DPO/TVKD steps)"
  timeout 240 $PY tests/gpu_check.py --teacher "$TEACHER" --student "$STUDENT" --data "$DATA" --out "$OUT" "${ARGS[@]}" \
    > "$OUT/gpu_check.txt" 2>&1
  GPU_CHECK_RC=$?
  tail -n 40 "$OUT/gpu_check.txt"
else
  echo "no testbed (set TVKD_CACHE to a folder holding testbed/, or allow the build): GPU checks skipped"
fi

stamp "tvkd bench --shapes paper"
if [ "$MODE" = dry ]; then
  timeout 600 $PY -c "from tvkd.bench.paper import main; main(device='cpu', shapes_name='tiny', out='$OUT/bench-paper.json')"
else
  timeout 480 $PY -c "from tvkd.bench.paper import main; main(device='cuda', out='$OUT/bench-paper.json')"
fi
BENCH_RC=$?

stamp "summary"
GPU_CHECK_RC=$GPU_CHECK_RC BENCH_RC=$BENCH_RC $PY - "$OUT" <<'EOF'
import json, os, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"gpu_check_rc": os.environ["GPU_CHECK_RC"], "bench_rc": os.environ["BENCH_RC"]}
gc = out / "gpu_check.json"
if gc.exists():
    g = json.loads(gc.read_text())
    summary["gpu_check"] = {k: v for k, v in g.items() if k.startswith(("offset_sign", "cache_", "tvkd_step")) or k == "device"}
    summary["gpu_check"]["finite_losses"] = all(r["finite"] for k in ("train_dpo", "train_tvkd") for r in g.get(k, []))
bp = out / "bench-paper.json"
if bp.exists():
    b = json.loads(bp.read_text())
    tc = b["teacher_cache"]
    summary["teacher_cache"] = {k: tc.get(k) for k in ("tokens_per_s", "achieved_tflops", "mfu", "peak_memory_gb",
                                                       "onepass_over_bare_forward", "reference_over_bare_forward")}
    if tc.get("tokens_per_s"):
        summary["teacher_cache"]["dpo_mix_7k_8M_tokens_minutes"] = 8e6 / tc["tokens_per_s"] / 60
    summary["order"] = {name: {k: r.get(k) for k in ("tokens_per_s", "tokens_per_s_over_padded", "padding_fraction")}
                        for name, r in b.get("order", {}).get("configs", {}).items()}
    summary["train"] = {}
    for t in b["train"]:
        for name, r in t["configs"].items():
            summary["train"][f"{t['pairs']}x{t['tokens_max']} {name}"] = {
                k: r.get(k) for k in ("tokens_per_s", "mfu", "peak_memory_gb", "step_over_plain", "memory_over_plain",
                                      "loss_abs_diff", "grad_max_abs_diff", "path")}
            if r.get("tokens_per_s"):
                summary["train"][f"{t['pairs']}x{t['tokens_max']} {name}"]["epoch_8M_tokens_minutes"] = (
                    8e6 / r["tokens_per_s"] / 60)
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
stamp "done; files in $OUT"
[ "$BENCH_RC" = 0 ]
