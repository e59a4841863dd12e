#!/usr/bin/env bash
# Everything a GPU must confirm, in one run (about 6-8 minutes on one H200; limit 10).
# Run from the repository root on the GPU machine, after scripts/gpu-prepare.sh here and with
# `.gpu` carried (it holds the executables; `target/release/qlora-cls`, if carried, wins):
#   bash scripts/gpu-check.sh
# That machine needs python3 with torch (CUDA), transformers, peft, safetensors, tokenizers;
# bitsandbytes comes from .gpu/site. No cargo. Steps, each with its own time limit:
#   0. the machine's torch must be the one the executables were linked against
#      (.gpu/torch_version, written by gpu-prepare.sh): a mismatch stops here, named
#   1. CUDA-vs-CPU bit-exactness tests: nf4, optim, model (filter `cuda`), dist (`nccl`, a
#      one-rank NCCL run); a test that says it skipped for want of CUDA counts as a failure
#   1b. data parallelism on CUDA tensors: the demo trained by 1 rank and by 2 ranks sharing
#      the GPU through Gloo (QLORA_DIST_CUDA_BACKEND=gloo: our streams and device handling),
#      and by N ranks over NCCL when N >= 2 GPUs exist; adapters compared (LoRA dropout on)
#   2. NF4 dequantize bandwidth (14336 x 4096 bf16) against the GPU's nominal peak and a
#      device-to-device copy, ours vs bitsandbytes
#   3. QLoRA on a Llama-3-8B-shaped model (random bf16 weights written to local disk by
#      bench/make_checkpoint.py), batch 8, MRPC rows: ours in the default configuration (no
#      compute-dtype flag: auto = bf16 on a GPU), the reference with bf16 compute: step time,
#      tokens/s, peak GPU memory (nvidia-smi sampled every 100 ms, the same for both sides,
#      plus the reference's torch.cuda.max_memory_allocated) and ours/reference for each
# Results: $OUT (default ./gpu-check-out): summary.md, summary.json, log.txt, tests.txt,
# ours-metrics.csv, reference-train.json, nvidia-smi.txt (the device tool returns 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-check-out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check-work}
GPU=$ROOT/.gpu
WARMUP=${GPU_WARMUP:-2}
STEPS=${GPU_STEPS:-10}
BATCH=8
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/log.txt") 2>&1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-570}
# A step's time limit: its own, cut to what is left of the whole run's budget.
lim() { local l=$1 r=$((BUDGET - ($(date +%s) - START) - 20)); ((r < l)) && l=$r; ((l < 5)) && l=5; echo "$l"; }
say() { printf '\n== [%4ds] %s\n' "$(($(date +%s) - START))" "$*"; }
fail=0

# --- environment -------------------------------------------------------------------------
PY=${PYTHON:-python3}
BIN=$ROOT/target/release/qlora-cls
[[ -x $BIN ]] || BIN=$GPU/bin/qlora-cls
KBIN=$GPU/bin/bench_kernels
for f in "$BIN" "$KBIN"; do
  [[ -x $f ]] || { echo "missing $f: run scripts/gpu-prepare.sh on the build machine and carry .gpu"; exit 2; }
done
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
  echo "python3 has no torch"; exit 2; }
# The pip CUDA runtime and NCCL (libcudart.so.13, libnccl.so.2) that torch itself uses.
nv_libs=$("$PY" - <<'EOF'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for pat in ("nvidia/*/lib", "nvidia/*/*/lib", "nvidia/cu13/lib"):
        dirs.update(d for d in glob.glob(os.path.join(sp, pat)) if os.path.isdir(d))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="$torch_lib${nv_libs:+:$nv_libs}:$GPU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[[ -d $GPU/site ]] && export PYTHONPATH="$GPU/site${PYTHONPATH:+:$PYTHONPATH}"
export QLORA_SHARED=$GPU/shared HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The tests call `$QLORA_VENV/bin/python` for their oracles and read fixtures below the
# CARGO_MANIFEST_DIR baked in at build time: point both at what exists here.
mkdir -p "$WORK/venv/bin" && ln -sf "$(command -v "$PY")" "$WORK/venv/bin/python"
export QLORA_VENV=$WORK/venv
if [[ -f $GPU/manifest_dir ]]; then
  baked=$(cat "$GPU/manifest_dir")
  if [[ ! -e $baked ]]; then
    mkdir -p "$(dirname "$baked")" 2>/dev/null && ln -s "$ROOT" "$baked" 2>/dev/null ||
      echo "note: cannot link $baked to $ROOT; tests reading fixtures may fail"
  fi
fi
if [[ -f $GPU/torch_version ]]; then
  built=$(cat "$GPU/torch_version")
  here=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda)')
  if [[ "$built" != "$here" ]]; then
    echo "torch mismatch: the executables in .gpu were linked against torch/CUDA '$built', this machine has '$here'."
    echo "Install torch ${built%% *} for CUDA ${built##* } here, or rebuild with scripts/gpu-prepare.sh against this machine's version."
    exit 2
  fi
  echo "torch/CUDA $here, as the executables were built against"
else
  echo "note: .gpu/torch_version missing (an old gpu-prepare.sh?); the torch version is not checked"
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$OUT/nvidia-smi.txt"
say "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null), $(nproc) CPUs"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

# Max GPU memory in use while a command runs (nvidia-smi every 100 ms), into $1.
with_gpu_mem() {
  local memfile=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$memfile.samples" 2>/dev/null &
  local smi=$!
  "$@"
  local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  sort -n "$memfile.samples" | tail -1 >"$memfile"
  return $rc
}

# --- 1. bit-exactness tests ----------------------------------------------------------------
say "1. CUDA-vs-CPU tests"
: >"$OUT/tests.txt"
TEST_SPECS=${GPU_TESTS:-"nf4:cuda optim:cuda model:cuda dist:nccl"}
test_results=()
for spec in $TEST_SPECS; do
  name=${spec%%:*} filter=${spec#*:}
  exe=$GPU/bin/$name
  if [[ ! -x $exe ]]; then
    echo "test $name: no executable in .gpu/bin" | tee -a "$OUT/tests.txt"
    test_results+=("$name:missing")
    continue
  fi
  echo "---- $name ($filter)" >>"$OUT/tests.txt"
  timeout "$(lim 90)" "$exe" "$filter" --test-threads=1 --nocapture >"$WORK/test-$name.txt" 2>&1
  rc=$?
  cat "$WORK/test-$name.txt" >>"$OUT/tests.txt"
  summary=$(grep -E '^test result:' "$WORK/test-$name.txt" | tail -1)
  if [[ $rc != 0 ]]; then
    status=FAIL; fail=1
  elif grep -qiE 'skipp(ed|ing).*(cuda|gpu|device)' "$WORK/test-$name.txt"; then
    status=SKIPPED-NO-CUDA; fail=1
  elif grep -qE ' 0 passed' <<<"$summary"; then
    status=NO-TESTS
  else
    status=PASS
  fi
  echo "test $name ($filter): $status  $summary"
  test_results+=("$name:$status")
done
printf '%s\n' "${test_results[@]}" >"$WORK/tests.status"

# --- 1b. data parallelism on CUDA tensors ------------------------------------------------
say "1b. data parallel training on CUDA (demo, 40 steps, LoRA dropout 0.1)"
DEMO=$WORK/demo-assets
timeout "$(lim 60)" "$BIN" demo-assets --out "$DEMO" >/dev/null || { echo "demo-assets failed"; fail=1; }
dp_train() { # name nproc [env assignments...]
  local name=$1 nproc=$2; shift 2
  rm -rf "$WORK/dp-$name"
  env "$@" timeout "$(lim 120)" bash scripts/launch.sh --nproc "$nproc" --master-port $((29600 + RANDOM % 1000)) -- \
    "$BIN" train --config configs/demo.yaml --model_dir "$DEMO/model" --tokenizer_dir "$DEMO/model" \
    --data_dir "$DEMO/data" --results_path "$WORK/dp-$name" --device cuda --max_steps 40 \
    --lora_dropout 0.1 --bnb_4bit_compute_dtype float32 --eval_before_training false \
    >"$WORK/dp-$name.log" 2>&1
}
dp_compare() { # name: max |dw| against the one-rank run; fails above 1e-4
  "$PY" - "$WORK/dp-one/adapter/adapter_model.safetensors" "$WORK/dp-$1/adapter/adapter_model.safetensors" <<'EOF'
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys(), "different adapter keys"
d = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"max |dw| {d:.3e}")
sys.exit(0 if d < 1e-4 else 1)
EOF
}
if dp_train one 1; then
  if dp_train gloo2 2 QLORA_DIST_CUDA_BACKEND=gloo; then
    r=$(dp_compare gloo2) || fail=1
    echo "2 ranks on one GPU through Gloo vs 1 rank: $r"
  else
    echo "2 ranks through Gloo on CUDA failed:"; tail -5 "$WORK/dp-gloo2.log"; fail=1
  fi
  ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
  if ((ngpu >= 2)); then
    if dp_train nccl "$ngpu"; then
      r=$(dp_compare nccl) || fail=1
      echo "$ngpu ranks over NCCL vs 1 rank: $r"
    else
      echo "$ngpu ranks over NCCL failed:"; tail -5 "$WORK/dp-nccl.log"; fail=1
    fi
  else
    echo "one GPU: the N-GPU NCCL run needs at least 2 (not run)"
  fi
else
  echo "the one-rank CUDA demo run failed:"; tail -5 "$WORK/dp-one.log"; fail=1
fi

# --- 2. dequantize bandwidth ---------------------------------------------------------------
say "2. NF4 dequantize bandwidth"
timeout "$(lim 60)" "$KBIN" nf4 --device cuda --rows 14336 --cols 4096 --reps 50 >"$WORK/nf4-ours.json" 2>"$WORK/nf4-ours.err" ||
  { echo "bench_kernels nf4 failed:"; tail -5 "$WORK/nf4-ours.err"; fail=1; }
timeout "$(lim 60)" "$KBIN" adamw --device cuda --reps 20 >"$WORK/adamw-ours.json" 2>"$WORK/adamw-ours.err" ||
  { echo "bench_kernels adamw failed:"; tail -5 "$WORK/adamw-ours.err"; fail=1; }
timeout "$(lim 90)" "$PY" bench/ref_kernels.py nf4 --device cuda --rows 14336 --cols 4096 --reps 50 \
  >"$WORK/nf4-ref.json" 2>"$WORK/nf4-ref.err" || { echo "bitsandbytes nf4 failed:"; tail -5 "$WORK/nf4-ref.err"; fail=1; }
timeout "$(lim 90)" "$PY" bench/ref_kernels.py adamw --device cuda --reps 20 \
  >"$WORK/adamw-ref.json" 2>"$WORK/adamw-ref.err" || { echo "bitsandbytes adamw failed:"; tail -5 "$WORK/adamw-ref.err"; fail=1; }
timeout "$(lim 60)" "$PY" - >"$WORK/copy-bw.json" <<'EOF'
import json, torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10): y.copy_(x)
e.record(); torch.cuda.synchronize()
secs = s.elapsed_time(e) / 1e3 / 10
print(json.dumps({"name": torch.cuda.get_device_name(0), "copy_bytes_per_s": 2 * x.numel() / secs}))
EOF

# --- 3. QLoRA on an 8B-shaped model --------------------------------------------------------
say "3. QLoRA, Llama-3-8B shape, batch $BATCH"
MODEL=${GPU_MODEL_DIR:-$WORK/llama8b}
free_gb=$(df -Pk "$(dirname "$MODEL")" | awk 'NR==2 {print int($4/1e6)}')
if [[ ! -f $MODEL/.complete && $free_gb -lt 18 ]]; then
  echo "only ${free_gb} GB free for the 16 GB checkpoint: step 3 skipped"; fail=1
else
  timeout "$(lim 240)" "$PY" bench/make_checkpoint.py --shape 8b --out "$MODEL" --mrpc_dir "$QLORA_SHARED/data/mrpc" || fail=1
  DATA=$WORK/mrpc-data
  n=$(((WARMUP + STEPS) * BATCH))
  mkdir -p "$DATA"
  head -n $((n + 1)) "$QLORA_SHARED/data/mrpc/train.tsv" >"$DATA/train.tsv"
  head -n $((BATCH + 1)) "$QLORA_SHARED/data/mrpc/dev.tsv" >"$DATA/dev.tsv"
  "$KBIN" order --n "$n" --batch "$BATCH" --seed 42 --epoch 1 | tail -1 >"$WORK/order.json" || fail=1

  # Ours in the default configuration (configs/mrpc.yaml, no compute-dtype flag: `auto`, bf16
  # on a GPU, gradient checkpointing as configured), against the reference's bf16.
  rm -rf "$WORK/ours-train"
  with_gpu_mem "$WORK/ours.gpumem" timeout "$(lim 180)" "$BIN" train --config configs/mrpc.yaml \
    --model_dir "$MODEL" --tokenizer_dir "$MODEL" --data_dir "$DATA" --results_path "$WORK/ours-train" \
    --max_steps $((WARMUP + STEPS)) --epochs 1 --eval_before_training false --device cuda \
    --batch_size $BATCH --eval_batch_size $BATCH --prompt perfect \
    --seed 42 --log_every 1 --train_splits train --eval_split validation ||
    { echo "our training run failed"; fail=1; }
  cp "$WORK/ours-train/metrics.csv" "$OUT/ours-metrics.csv" 2>/dev/null

  with_gpu_mem "$WORK/ref.gpumem" timeout "$(lim 240)" "$PY" bench/reference_qlora.py --model_dir "$MODEL" \
    --data_dir "$DATA" --order "$WORK/order.json" --warmup "$WARMUP" --steps "$STEPS" \
    --device cuda --compute_dtype bfloat16 --batch_size $BATCH --out "$WORK/reference-train.json" ||
    { echo "the reference training run failed"; fail=1; }
  cp "$WORK/reference-train.json" "$OUT/" 2>/dev/null

  # Ours again within the 7 GB goal (`--max_memory 7GiB`): the default `auto` keeps every
  # layer's activations when the GPU has room; under a budget it recomputes the fewest layers
  # whose estimate fits.
  rm -rf "$WORK/ours-capped-train"
  with_gpu_mem "$WORK/ours-capped.gpumem" timeout "$(lim 120)" "$BIN" train --config configs/mrpc.yaml \
    --model_dir "$MODEL" --tokenizer_dir "$MODEL" --data_dir "$DATA" --results_path "$WORK/ours-capped-train" \
    --max_steps $((WARMUP + STEPS)) --epochs 1 --eval_before_training false --device cuda \
    --batch_size $BATCH --eval_batch_size $BATCH --prompt perfect \
    --seed 42 --log_every 1 --train_splits train --eval_split validation --max_memory 7GiB ||
    echo "our run with max_memory 7GiB failed (reported, not counted as a failure)"
fi

# --- report --------------------------------------------------------------------------------
say "report"
"$PY" bench/gpu_report.py --work "$WORK" --out "$OUT" --warmup "$WARMUP" || fail=1
say "done (exit status $fail); results in $OUT"
exit $fail
