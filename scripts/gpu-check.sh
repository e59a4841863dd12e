#!/usr/bin/env bash
# Everything a GPU must confirm, in one short run (under 6 minutes on one H200), and the same
# script on the CPU build so that a scripting mistake shows up in `make test`, not on the GPU.
#
#   bash scripts/gpu-check.sh          # on the GPU machine, from the repository root, with
#                                      # `.gpu` (scripts/gpu-prepare.sh) carried; no cargo
#   bash scripts/gpu-check.sh --cpu    # here, on the CPU build (target/release), < 3 minutes
#   bash scripts/gpu-check.sh --record-fixtures   # gpu-prepare.sh: the oracle fixtures -> .gpu
#
# Steps, in this order in both modes (a CUDA-only step prints `skipped: --cpu (...)`):
#   preflight    ldd of our executables (nothing "not found"), cuobjdump --list-elf shows
#                sm_90, `qlora-cls doctor --device cuda` (--cpu: `--device cpu`); the torch
#                the executables were linked against. A failure here stops the run.
#   fixtures     the tests' oracle Python: $WORK/venv/bin/python, an exec wrapper (never a
#                symlink: a symlinked venv python loses its venv) that answers the oracle calls
#                the CUDA tests make from fixtures recorded on the build machine
#                (.gpu/fixtures, written by gpu-prepare.sh), so the GPU machine's own
#                transformers/peft/bitsandbytes never matter. --cpu records them afresh and
#                replays them once, which checks the wrapper both ways.
#   tests-*      the CUDA-vs-CPU tests, by exact name, under CUDA_LAUNCH_BLOCKING=1
#                NCCL_DEBUG=WARN: a test that reports a skipped CUDA part fails on the GPU;
#                every named test must run (a renamed test fails the step).
#   nf4-8b       the 14336x4096 bf16 double-quant quantize/dequantize CUDA-vs-CPU check (the
#                doctor's kernel self-check, read from its output; no test covers that shape)
#   ckpt-8b      a Llama-3-8B-shaped checkpoint (random bf16, ~16 GB) on local disk, the MRPC
#                rows and the batch order
#   train-8b     our QLoRA training on it, batch 8, default config: tokens/s, peak GPU memory
#   ref-8b       the reference (transformers + PEFT + bitsandbytes), capped to a few steps
#   kernels      NF4 dequantize bandwidth (14336x4096) and the AdamW8bit step: ours
#   kernels-ref  the same with bitsandbytes, and a device-to-device copy (warnings only)
#   dp           the demo trained by 1 rank and by 2 ranks (Gloo; on CUDA through
#                QLORA_DIST_CUDA_BACKEND=gloo, and NCCL over all GPUs when there are >= 2):
#                max|dw| / max|w| of the adapters and the eval metrics (cuBLAS reduction order
#                and the attention backward are not bitwise stable, so not bit-exact)
#   train-8b-7g  ours again under --max_memory 7GiB, if time is left (warning only)
# Then bench/gpu_report.py writes $OUT/summary.json (every figure) and $OUT/summary.md, and
# a table prints: step, status, seconds, key figure. Exit status 0 only when no step failed.
# A failing step prints its log's last 40 lines and every `panicked`/`error` line.
#
# Results: $OUT (the device tool's; default ./gpu-check-out, --cpu: runs/gpu-check-cpu):
# summary.md, summary.json, log.txt, tests.txt, doctor.txt, nvidia-smi.txt, logs/<step>.log.
# Knobs: GPU_CHECK_BUDGET (s, default 340; --cpu 170), GPU_CHECK_WORK, GPU_STEPS, GPU_WARMUP,
# GPU_REF_STEPS, GPU_DP_TOL, GPU_CHECK_CONTINUE=1 (go on after a failed preflight), PYTHON.
# shellcheck disable=SC2317 # the step functions are called through `step`
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
LC_NUMERIC=C

MODE=gpu
case "${1:-}" in
  "" | --gpu) ;;
  --cpu) MODE=cpu ;;
  --record-fixtures) MODE=record ;;
  -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: scripts/gpu-check.sh [--cpu | --record-fixtures]" >&2; exit 2 ;;
esac

GPU=$ROOT/.gpu
BATCH=8
WARMUP=${GPU_WARMUP:-2}
STEPS=${GPU_STEPS:-10}
REF_WARMUP=1
REF_STEPS=${GPU_REF_STEPS:-3}
if [[ $MODE == gpu ]]; then
  OUT=${GPU_CHECK_OUT:-${OUT:-$ROOT/gpu-check-out}}
  WORK=${GPU_CHECK_WORK:-/tmp/gpu-check-work}
  BUDGET=${GPU_CHECK_BUDGET:-340}
  DP_STEPS=20 DP_TOL=${GPU_DP_TOL:-2e-3}
else
  OUT=${GPU_CHECK_OUT:-$ROOT/runs/gpu-check-cpu}
  WORK=${GPU_CHECK_WORK:-/tmp/gpu-check-cpu.$$}
  BUDGET=${GPU_CHECK_BUDGET:-170}
  DP_STEPS=8 DP_TOL=${GPU_DP_TOL:-1e-4}
fi
if [[ $MODE == record ]]; then WORK=$(mktemp -d /tmp/gpu-check-record.XXXXXX) OUT=$WORK/out; fi
rm -rf "$WORK/logs" "$OUT/logs"
mkdir -p "$OUT/logs" "$WORK/logs"
TEE_PID=""
if [[ $MODE != record ]]; then
  exec > >(tee "$OUT/log.txt") 2>&1
  TEE_PID=$!
fi
START=$(date +%s)

# --- helpers ---------------------------------------------------------------------------------
say() { printf '\n== [%4ds] %s\n' "$(($(date +%s) - START))" "$*"; }
# Seconds left of the current step (its deadline is set by `step`); at least 1.
left() { local l=$((DEADLINE - $(date +%s))); ((l < 1)) && l=1; echo "$l"; }
tmo() { timeout -k 5 "$(left)" "$@"; }
# Our executables: LD_LIBRARY_PATH for them only (python and nvidia-smi keep their own).
# `ours [VAR=value ...] EXE ARGS...`, under the step's deadline.
OUR_ENV=()
ours() { tmo env "${OUR_ENV[@]}" "$@"; }
# In a step function: mark the step skipped, with why.
skip() { SKIP=$*; echo "skipped: $*"; }
gpu_only() { # WHY: true on the GPU; on --cpu marks the step skipped
  [[ $MODE == gpu ]] && return 0
  skip "--cpu (no CUDA device): $*"
  return 1
}
report_py() { "$PY" bench/gpu_report.py --work "$WORK" --out "$OUT" --warmup "$WARMUP" --mode "$MODE" "$@"; }

S_NAME=() S_STATUS=() S_SECS=() S_FIG=()
FAILED=0 STOP=""
: >"$WORK/steps.tsv"
record() { # NAME STATUS SECONDS FIGURE
  S_NAME+=("$1") S_STATUS+=("$2") S_SECS+=("$3") S_FIG+=("$4")
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(tr '\t\n' '  ' <<<"$4")" >>"$WORK/steps.tsv"
}
print_failure() { # LOG
  echo "---- last 40 lines of $1"
  tail -n 40 "$1"
  local errs n
  errs=$(grep -inE 'panicked|error' "$1")
  if [[ -n $errs ]]; then
    n=$(wc -l <<<"$errs")
    echo "---- $n panicked/error line(s) of $1"
    head -n 200 <<<"$errs"
    ((n > 200)) && echo "(... $((n - 200)) more)"
  fi
  echo "----"
}

# step [--soft] [--reserve S] NAME LIMIT FUNCTION ARGS...: runs FUNCTION with its output in
# logs/NAME.log under a deadline of LIMIT seconds, cut to what is left of the budget (less S
# kept for the steps after it). FUNCTION sets FIG (the key figure) or calls `skip`. A failure
# (non-zero; 124/137: the deadline) prints the log's tail; --soft makes it a warning.
step() {
  local soft=0 reserve=0
  while [[ $1 == --* ]]; do
    case $1 in
      --soft) soft=1; shift ;;
      --reserve) reserve=$2; shift 2 ;;
    esac
  done
  local name=$1 limit=$2; shift 2
  local log=$WORK/logs/$name.log
  FIG="" SKIP=""
  if [[ -n $STOP ]]; then
    record "$name" "NOT RUN" 0 "$STOP"
    return
  fi
  local avail=$((BUDGET - ($(date +%s) - START))) floor=10
  ((limit > avail - reserve)) && limit=$((avail - reserve))
  ((floor > avail)) && floor=$avail
  ((limit < floor)) && limit=$floor
  if ((limit < 5)); then
    if ((soft)); then record "$name" SKIP 0 "no time left of the ${BUDGET}s budget"
    else record "$name" FAIL 0 "no time left of the ${BUDGET}s budget"; FAILED=1; fi
    say "$name: no time left"
    return
  fi
  DEADLINE=$(($(date +%s) + limit))
  say "$name (limit ${limit}s)"
  local t0=$EPOCHREALTIME rc status
  "$@" >"$log" 2>&1
  rc=$?
  local secs
  secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  cp "$log" "$OUT/logs/" 2>/dev/null
  if [[ -n $SKIP ]]; then
    status=SKIP FIG=$SKIP
  elif ((rc == 0)); then
    status=PASS
  else
    if ((rc == 124 || rc == 137)); then FIG="timed out after ${limit}s${FIG:+; $FIG}"; fi
    [[ -n $FIG ]] || FIG="exit status $rc: $(grep -m1 -iE 'panicked|error' "$log" | cut -c1-110)"
    if ((soft)); then status=WARN; else status=FAIL FAILED=1; fi
  fi
  printf '   %s %ss %s\n' "$status" "$secs" "$FIG"
  [[ $status == FAIL || $status == WARN ]] && print_failure "$log"
  record "$name" "$status" "$secs" "$FIG"
}

# --- executables and environment -------------------------------------------------------------
# The newest cargo test executable `deps/NAME-<hash>` of target/release, or .gpu/bin/NAME:
# .gpu first on the GPU (a stale target/ may linger there), target/ first on the CPU.
test_exe() {
  local name=$1 t g
  t=$(find "$ROOT/target/release/deps" -maxdepth 1 -type f -executable -name "$name-*" ! -name '*.*' \
    -printf '%T@ %p\n' 2>/dev/null | sort -nr | head -1 | cut -d' ' -f2-)
  g=$GPU/bin/$name
  [[ -x $g ]] || g=""
  if [[ $MODE == cpu ]]; then t=${t:-$g}; else t=${g:-$t}; fi
  [[ -n $t ]] || { echo "no test executable for tests/$name.rs (target/release/deps or .gpu/bin)" >&2; return 1; }
  echo "$t"
}
pick() { # the first executable of its arguments
  local f
  for f; do [[ -x $f ]] && { echo "$f"; return; }; done
}
if [[ $MODE == cpu ]]; then
  BIN=$(pick "$ROOT/target/release/qlora-cls" "$GPU/bin/qlora-cls")
  KBIN=$(pick "$ROOT/target/release/examples/bench_kernels" "$GPU/bin/bench_kernels")
  PY=${PYTHON:-$(pick "${QLORA_VENV:-$ROOT/.venv}/bin/python" "$(command -v python3)")}
else
  BIN=$(pick "$GPU/bin/qlora-cls" "$ROOT/target/release/qlora-cls")
  KBIN=$(pick "$GPU/bin/bench_kernels" "$ROOT/target/release/examples/bench_kernels")
  PY=${PYTHON:-python3}
fi
# The Python the oracle wrapper runs when it does not answer from fixtures.
REAL_PY=$(command -v "$PY")
[[ $MODE == gpu ]] || REAL_PY=$(pick "${QLORA_VENV:-$ROOT/.venv}/bin/python" "$REAL_PY")
export QLORA_VENV=$WORK/venv HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false
if [[ $MODE == gpu ]]; then
  export QLORA_SHARED=$GPU/shared
  [[ -d $GPU/site ]] && export PYTHONPATH="$GPU/site${PYTHONPATH:+:$PYTHONPATH}"
  # The executables' rpath points at the build machine's venv: here they get this machine's
  # torch and its pip CUDA runtime and NCCL, then .gpu/lib.
  torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
  nv_libs=$("$PY" - 2>/dev/null <<'EOF'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for pat in ("nvidia/*/lib", "nvidia/*/*/lib"):
        dirs.update(d for d in glob.glob(os.path.join(sp, pat)) if os.path.isdir(d))
print(":".join(sorted(dirs)))
EOF
  )
  OUR_ENV=("LD_LIBRARY_PATH=${torch_lib}${nv_libs:+:$nv_libs}:$GPU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
fi

# The oracle fixtures the CUDA tests need, and the CPU test whose run records each (its
# oracle call is the same one: `<script> <command...> DIR`, the key is `script.command...`).
FIXTURE_KEYS=(nf4_oracle.quantize model_oracle.fixtures)
declare -A FIXTURE_BY=([nf4_oracle.quantize]="nf4 codes_match_bitsandbytes"
  [model_oracle.fixtures]="model fp32_logits_match_transformers")
# The CUDA-vs-CPU tests: executable, then exact test names.
CUDA_TESTS=(
  "nf4 cuda_matches_cpu_bit_for_bit cuda_matmul_small_writes_rows_past_the_grid_cap"
  "optim cuda_kernels_match_cpu_bit_for_bit all_nan_block_gets_a_zero_absmax"
  "model dropout_cuda_matches_cpu_bit_for_bit training_pass_on_cuda_matches_cpu"
  "dist nccl_one_rank"
)

# --- the oracle wrapper ----------------------------------------------------------------------
# $QLORA_VENV/bin/python, an exec wrapper: `record` runs the real Python and keeps a copy of
# the output folder (the last argument) of the listed oracle calls under FIXDIR/<key>;
# `replay` answers those calls from FIXDIR/<key> after checking that every file the test
# wrote into the folder beforehand (its inputs) is byte-identical to the recorded one.
# Anything else is `exec REAL_PYTHON "$@"`, without our LD_LIBRARY_PATH.
write_oracle_python() { # record|replay FIXDIR
  mkdir -p "$QLORA_VENV/bin"
  {
    echo '#!/bin/sh'
    echo "# The tests' oracle Python, written by scripts/gpu-check.sh ($1)."
    echo "MODE='$1' FIX='$2' REAL='$REAL_PY' KEYS='${FIXTURE_KEYS[*]}'"
    cat <<'EOF'
unset LD_LIBRARY_PATH
export LC_ALL=C
# The files a test wrote into the oracle's folder before calling it (its inputs), summed.
inputs() { (cd "$1" && for f in *; do [ -f "$f" ] && sha256sum "$f"; done; true); }
key="" dir=""
case "$1" in
  */tests/oracles/*.py)
    n=$# i=0
    for a in "$@"; do
      i=$((i + 1))
      if [ $i -eq 1 ]; then key=$(basename "$a" .py)
      elif [ $i -lt $n ]; then key="$key.$a"
      else dir=$a
      fi
    done
    case " $KEYS " in *" $key "*) [ -d "$dir" ] || key="" ;; *) key="" ;; esac
    ;;
esac
if [ -n "$key" ] && [ "$MODE" = record ]; then
  sums=$(inputs "$dir")
  "$REAL" "$@" || exit $?
  rm -rf "${FIX:?}/$key" && mkdir -p "$FIX" && cp -R "$dir" "$FIX/$key" || exit 1
  # The inputs are kept as their checksums only (the test writes them again there).
  printf '%s\n' "$sums" | while read -r _ f; do [ -n "$f" ] && rm -f "$FIX/$key/$f"; done
  printf '%s\n' "$sums" >"$FIX/$key/.inputs.sha256"
  exit 0
fi
if [ -n "$key" ] && [ -d "$FIX/$key" ]; then
  if ! printf '%s\n' "$(inputs "$dir")" | cmp -s - "$FIX/$key/.inputs.sha256"; then
    echo "oracle replay $key: the test's inputs in $dir differ from the recorded ones; rerun scripts/gpu-prepare.sh" >&2
    exit 1
  fi
  cp -R "$FIX/$key/." "$dir/" && rm -f "$dir/.inputs.sha256" && echo "$key" >>"$FIX/replayed.log" && exit 0
  exit 1
fi
[ -n "$key" ] && echo "note: oracle $key was not recorded; running $REAL" >&2
exec "$REAL" "$@"
EOF
  } >"$QLORA_VENV/bin/python"
  chmod +x "$QLORA_VENV/bin/python"
}

# Runs the CPU test that makes each fixture's oracle call, through the recording wrapper.
record_fixtures() { # DIR
  local dir=$1 key name test exe
  rm -rf "$dir" && mkdir -p "$dir" || return
  write_oracle_python record "$dir"
  for key in "${FIXTURE_KEYS[@]}"; do
    read -r name test <<<"${FIXTURE_BY[$key]}"
    exe=$(test_exe "$name") || return
    echo "recording $key through $name::$test"
    ours "$exe" "$test" --exact --test-threads=1 || return
    [[ -d $dir/$key ]] || { echo "$name::$test made no $key oracle call (test changed?)"; return 1; }
  done
  du -sh "$dir"/* | sed 's/^/  /'
}

# --- steps -----------------------------------------------------------------------------------
step_preflight() {
  local bad=0 exe exes=() missing archs cuobj n_ok n_fail t
  echo "mode $MODE, $(nproc) CPUs; qlora-cls: ${BIN:-none}; bench_kernels: ${KBIN:-none}"
  if [[ -z $BIN ]]; then
    FIG="no qlora-cls executable"
    echo "$FIG: run scripts/gpu-prepare.sh (GPU) or cargo build --release (--cpu)"
    return 1
  fi
  if [[ $MODE == gpu ]]; then
    if ! nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1; then
      FIG="nvidia-smi failed"
      cat "$OUT/nvidia-smi.txt"
      return 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    local here built
    here=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda)') ||
      { echo "$PY has no torch"; return 1; }
    if [[ -f $GPU/torch_version ]]; then
      built=$(cat "$GPU/torch_version")
      if [[ $built != "$here" ]]; then
        FIG="torch mismatch: built against '$built', this machine has '$here'"
        echo "$FIG: install torch ${built%% *} for CUDA ${built##* } here, or rebuild against '$here'"
        return 1
      fi
      echo "torch/CUDA $here, as the executables were built against"
    else
      echo "note: .gpu/torch_version missing: the torch version is not checked"
    fi
  fi
  exes=("$BIN")
  [[ -n $KBIN ]] && exes+=("$KBIN")
  for t in "${CUDA_TESTS[@]}"; do
    exe=$(test_exe "${t%% *}") && exes+=("$exe")
  done
  # 1. every shared library resolves (with the LD_LIBRARY_PATH the steps give them)
  for exe in "${exes[@]}"; do
    missing=$(env "${OUR_ENV[@]}" ldd "$exe" 2>&1 | grep 'not found')
    [[ -n $missing ]] && { echo "ldd $exe:"; echo "$missing"; bad=1; }
  done
  ((bad)) && { FIG="libraries not found (see ldd above)"; return 1; }
  echo "ldd: every library found for ${#exes[@]} executables"
  # 2. the CUDA kernels carry sm_90 machine code
  cuobj=$(pick "$GPU/bin/cuobjdump" "$(command -v cuobjdump)" \
    "$(find "$ROOT/.venv/lib" -path '*/bin/cuobjdump' -type f 2>/dev/null | head -1)")
  archs=""
  if [[ -z $cuobj ]]; then
    archs="sm_90 not checked (no cuobjdump)"
    echo "note: cuobjdump not found (not in .gpu/bin, PATH or .venv; gpu-prepare.sh carries it): $archs"
  else
    for exe in "${exes[@]}"; do
      local elfs
      elfs=$("$cuobj" --list-elf "$exe" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')
      echo "cuobjdump --list-elf $(basename "$exe"): ${elfs:-no CUDA ELF}"
      if [[ -z $elfs && $MODE != gpu ]]; then
        archs="no CUDA kernels in this build"
      elif ! grep -qw sm_90 <<<"$elfs"; then
        echo "$exe: no sm_90 machine code"; bad=1
      else
        archs=${elfs% }
      fi
    done
    ((bad)) && { FIG="no sm_90 machine code"; return 1; }
  fi
  # 3. the doctor: what was compiled in, the devices, kernel self-checks, all-reduce, a step
  local dev=cuda
  [[ $MODE == gpu ]] || dev=cpu
  ours "$BIN" doctor --device "$dev" >"$WORK/doctor.txt" 2>&1
  local rc=$?
  cp "$WORK/doctor.txt" "$OUT/doctor.txt"
  cat "$WORK/doctor.txt"
  n_ok=$(grep -c '^\[  ok  \]' "$WORK/doctor.txt")
  n_fail=$(grep -c '^\[ FAIL \]' "$WORK/doctor.txt")
  FIG="ldd ok; ${archs}; doctor --device $dev: $n_ok ok, $n_fail FAIL"
  ((rc == 0)) || { FIG="$FIG (exit $rc)"; return "$rc"; }
}

step_fixtures() {
  local key dir name test exe
  if [[ $MODE == gpu ]]; then
    for key in "${FIXTURE_KEYS[@]}"; do
      [[ -d $GPU/fixtures/$key ]] || { FIG="no .gpu/fixtures/$key"; echo "$FIG: rerun scripts/gpu-prepare.sh"; return 1; }
    done
    # The tests read fixtures and spawn qlora-cls below the CARGO_MANIFEST_DIR and
    # CARGO_TARGET_TMPDIR baked in at build time: make those paths exist here.
    local baked tmpdir
    baked=$(cat "$GPU/manifest_dir" 2>/dev/null)
    if [[ -n $baked && ! -e $baked ]]; then
      mkdir -p "$(dirname "$baked")" && ln -s "$ROOT" "$baked" ||
        echo "note: cannot link $baked to $ROOT: the tests' fixture folders may not exist"
    fi
    if [[ ! -e $ROOT/target/release/qlora-cls ]]; then
      mkdir -p "$ROOT/target/release" && ln -s "$GPU/bin/qlora-cls" "$ROOT/target/release/qlora-cls"
    fi
    tmpdir=$(cat "$GPU/target_tmpdir" 2>/dev/null)
    if [[ -n $tmpdir ]] && mkdir -p "$tmpdir"; then
      for key in "${FIXTURE_KEYS[@]}"; do
        [[ $key == *.fixtures ]] || continue
        rm -rf "${tmpdir:?}/${key%%.*}" && cp -R "$GPU/fixtures/$key" "$tmpdir/${key%%.*}"
      done
    fi
    FIXDIR=$GPU/fixtures
  else
    # Record them here, then answer the same calls from the recording.
    record_fixtures "$WORK/fixtures" || { FIG="recording failed"; return 1; }
    FIXDIR=$WORK/fixtures
  fi
  rm -f "$FIXDIR/replayed.log" 2>/dev/null
  write_oracle_python replay "$FIXDIR"
  if [[ $MODE == cpu ]]; then
    for key in "${FIXTURE_KEYS[@]}"; do
      read -r name test <<<"${FIXTURE_BY[$key]}"
      exe=$(test_exe "$name") || return
      echo "replaying $key for $name::$test"
      ours "$exe" "$test" --exact --test-threads=1 || { FIG="$name::$test fails on the replayed $key"; return 1; }
      grep -qx "$key" "$FIXDIR/replayed.log" 2>/dev/null || { FIG="$key was not replayed"; return 1; }
    done
    FIG="recorded and replayed: ${FIXTURE_KEYS[*]}"
  else
    FIG="carried: ${FIXTURE_KEYS[*]} ($(du -sh "$FIXDIR" | cut -f1))"
  fi
}

step_tests() { # NAME TEST...
  local name=$1 exe out summary passed want=$(($# - 1))
  shift
  exe=$(test_exe "$name") || { FIG="no test executable"; return 1; }
  out=$WORK/test-$name.txt
  echo "$exe $* --exact --test-threads=1 --nocapture"
  ours CUDA_LAUNCH_BLOCKING=1 NCCL_DEBUG=WARN "$exe" "$@" --exact --test-threads=1 --nocapture >"$out" 2>&1
  local rc=$?
  cat "$out"
  { echo "---- $name: $*"; cat "$out"; } >>"$OUT/tests.txt"
  summary=$(grep -E '^test result:' "$out" | tail -1)
  passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$summary")
  local skips
  skips=$(grep -ciE 'skipp(ed|ing)' "$out")
  if ((rc != 0)); then
    FIG="failed: ${summary:-no test result}"; echo "$name:FAIL" >>"$WORK/tests.status"; return "$rc"
  fi
  if [[ ${passed:-0} != "$want" ]]; then
    FIG="ran ${passed:-0} of the $want named tests (renamed?)"; echo "$name:FAIL" >>"$WORK/tests.status"; return 1
  fi
  if ((skips > 0)) && [[ $MODE == gpu ]]; then
    FIG="$skips test(s) skipped their CUDA part"; echo "$name:SKIPPED-NO-CUDA" >>"$WORK/tests.status"; return 1
  fi
  FIG="$passed/$want passed"
  ((skips > 0)) && FIG="$FIG (CUDA parts skipped: --cpu)"
  echo "$name:PASS" >>"$WORK/tests.status"
}

step_nf4_8b() {
  gpu_only "the doctor's 14336x4096 check runs on CUDA" || return 0
  local line
  line=$(grep '14336' "$WORK/doctor.txt" 2>/dev/null)
  echo "${line:-the doctor printed no 14336x4096 line}"
  [[ -n $line ]] || { FIG="no 14336x4096 self-check in the doctor's output"; return 1; }
  FIG=$(head -1 <<<"$line" | sed 's/^\[[^]]*\] //' | cut -c1-100)
  ! grep -q '^\[ FAIL \]' <<<"$line"
}

MODEL=${GPU_MODEL_DIR:-$WORK/llama8b}
DATA=$WORK/mrpc-data
step_ckpt8b() {
  gpu_only "the 16 GB 8B-shaped checkpoint feeds the GPU training steps" || return 0
  local free_gb n
  mkdir -p "$(dirname "$MODEL")"
  free_gb=$(df -Pk "$(dirname "$MODEL")" | awk 'NR==2 {print int($4/1e6)}')
  if [[ ! -f $MODEL/.complete ]] && ((free_gb < 18)); then
    FIG="only ${free_gb} GB free for the 16 GB checkpoint"; return 1
  fi
  tmo "$PY" bench/make_checkpoint.py --shape 8b --out "$MODEL" --mrpc_dir "$QLORA_SHARED/data/mrpc" || return
  n=$(((WARMUP + STEPS) * BATCH))
  mkdir -p "$DATA"
  head -n $((n + 1)) "$QLORA_SHARED/data/mrpc/train.tsv" >"$DATA/train.tsv"
  head -n $((BATCH + 1)) "$QLORA_SHARED/data/mrpc/dev.tsv" >"$DATA/dev.tsv"
  ours "$KBIN" order --n "$n" --batch "$BATCH" --seed 42 --epoch 1 | tail -1 >"$WORK/order.json" || return 1
  FIG="$(du -sh "$MODEL" | cut -f1) checkpoint, $n rows"
}
needs_ckpt() { [[ -f $MODEL/.complete && -s $WORK/order.json ]] || { skip "no checkpoint (ckpt-8b failed)"; return 1; }; }

# Max GPU memory in use while a command runs (nvidia-smi every 100 ms, the whole device's
# use, CUDA context included), into FILE.
with_gpu_mem() { # FILE CMD...
  local memfile=$1 smi rc
  shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$memfile.samples" 2>/dev/null &
  smi=$!
  "$@"
  rc=$?
  kill "$smi" 2>/dev/null
  wait "$smi" 2>/dev/null
  sort -n "$memfile.samples" | tail -1 >"$memfile"
  return "$rc"
}

ours_8b() { # RUN_NAME [EXTRA FLAGS...]: our trainer, configs/mrpc.yaml as it is (auto = bf16)
  local run=$WORK/$1
  shift
  rm -rf "$run"
  with_gpu_mem "$run.gpumem" ours "$BIN" train --config configs/mrpc.yaml \
    --model_dir "$MODEL" --tokenizer_dir "$MODEL" --data_dir "$DATA" --results_path "$run" \
    --max_steps $((WARMUP + STEPS)) --epochs 1 --eval_before_training false --device cuda \
    --batch_size "$BATCH" --eval_batch_size "$BATCH" --prompt perfect \
    --seed 42 --log_every 1 --train_splits train --eval_split validation "$@"
}

step_train8b() {
  gpu_only "Llama-3-8B-shaped training needs a GPU" || return 0
  needs_ckpt || return 0
  ours_8b ours-train || return
  cp "$WORK/ours-train/metrics.csv" "$OUT/ours-metrics.csv" 2>/dev/null
  FIG=$(report_py --figure train_ours)
}

step_ref8b() {
  gpu_only "the reference's 8B training needs a GPU" || return 0
  needs_ckpt || return 0
  with_gpu_mem "$WORK/ref.gpumem" tmo "$PY" bench/reference_qlora.py --model_dir "$MODEL" \
    --data_dir "$DATA" --order "$WORK/order.json" --warmup "$REF_WARMUP" --steps "$REF_STEPS" \
    --device cuda --compute_dtype bfloat16 --batch_size "$BATCH" --out "$WORK/reference-train.json" || return
  cp "$WORK/reference-train.json" "$OUT/"
  FIG=$(report_py --figure train_ref)
}

step_train8b_7g() {
  gpu_only "Llama-3-8B-shaped training needs a GPU" || return 0
  needs_ckpt || return 0
  ((DEADLINE - $(date +%s) >= 45)) || { skip "under 45 s of the budget left"; return 0; }
  ours_8b ours-capped-train --max_memory 7GiB || return
  FIG=$(report_py --figure train_capped)
}

step_kernels() {
  [[ -n $KBIN ]] || { FIG="no bench_kernels (cargo build --release --example bench_kernels)"; return 1; }
  local nf4=(--rows 14336 --cols 4096 --reps 20 --device cuda) adamw=(--reps 10 --device cuda)
  [[ $MODE == gpu ]] || nf4=(--rows 512 --cols 1024 --reps 2 --device cpu) adamw=(--reps 2 --device cpu)
  ours "$KBIN" nf4 "${nf4[@]}" >"$WORK/nf4-ours.json" || return
  ours "$KBIN" adamw "${adamw[@]}" >"$WORK/adamw-ours.json" || return
  tail -1 "$WORK/nf4-ours.json" | cut -c1-300
  FIG=$(report_py --figure kernels_ours)
  if [[ $MODE == gpu ]]; then
    # What the 8-wide NF4 dequantize gains over the one-byte-per-thread kernel.
    QLORA_NF4_DEQUANT_SCALAR=1 ours "$KBIN" nf4 "${nf4[@]}" >"$WORK/nf4-scalar.json" || return
    local gain
    gain=$("$PY" - "$WORK/nf4-ours.json" "$WORK/nf4-scalar.json" <<'EOF'
import json, statistics, sys
w, s = (statistics.median(json.loads(open(p).read().splitlines()[-1])["dequantize_s"]) for p in sys.argv[1:])
print(f"8-wide dequantize {w * 1e6:.0f} us vs scalar {s * 1e6:.0f} us ({s / w:.2f}x)")
EOF
) || return
    echo "$gain"
    FIG="$FIG; $gain"
  else
    echo "8-wide vs scalar NF4 dequantize: skipped: --cpu (a CUDA kernel choice)"
  fi
}

step_kernels_ref() {
  local nf4=(--rows 14336 --cols 4096 --reps 20 --device cuda) adamw=(--reps 10 --device cuda) bad=0
  [[ $MODE == gpu ]] || nf4=(--rows 512 --cols 1024 --reps 2 --device cpu) adamw=(--reps 2 --device cpu)
  tmo "$PY" bench/ref_kernels.py nf4 "${nf4[@]}" >"$WORK/nf4-ref.json" || bad=1
  tmo "$PY" bench/ref_kernels.py adamw "${adamw[@]}" >"$WORK/adamw-ref.json" || bad=1
  if [[ $MODE == gpu ]]; then
    tmo "$PY" - >"$WORK/copy-bw.json" <<'EOF' || bad=1
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
  else
    echo "device-to-device copy: skipped: --cpu (no CUDA device)"
  fi
  FIG=$(report_py --figure kernels_ref)
  return "$bad"
}

DEMO=$WORK/demo-assets
dp_train() { # NAME NPROC [VAR=value...]: the demo, DP_STEPS steps, LoRA dropout 0.1
  local name=$1 nproc=$2 dev=cuda
  shift 2
  [[ $MODE == gpu ]] || dev=cpu
  rm -rf "$WORK/dp-$name"
  echo "-- $name: $nproc rank(s) $*"
  tmo env "$@" bash scripts/launch.sh --nproc "$nproc" --master-port $((29600 + RANDOM % 1000)) -- \
    env "${OUR_ENV[@]}" "$BIN" train --config configs/demo.yaml --model_dir "$DEMO/model" \
    --tokenizer_dir "$DEMO/model" --data_dir "$DEMO/data" --results_path "$WORK/dp-$name" \
    --device "$dev" --max_steps "$DP_STEPS" --epochs 1 --lora_dropout 0.1 \
    --bnb_4bit_compute_dtype float32 --eval_before_training false --eval_batch_size 32 \
    >"$WORK/dp-$name.log" 2>&1
  local rc=$?
  tail -n 5 "$WORK/dp-$name.log"
  return "$rc"
}
dp_compare() { # NAME: max|dw| / max|w| against the one-rank run, and both evaluations
  tmo "$PY" - "$WORK/dp-one" "$WORK/dp-$1" "$DP_TOL" >"$WORK/dp-$1.json" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
one, other, tol = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
a = load_file(one / "adapter" / "adapter_model.safetensors")
b = load_file(other / "adapter" / "adapter_model.safetensors")
assert a.keys() == b.keys(), f"different adapter keys: {sorted(a.keys() ^ b.keys())}"
dw = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
w = max(a[k].double().abs().max().item() for k in a)
def ev(run):
    s = json.loads((run / "summary.json").read_text())
    return {"world_size": s.get("world_size"), "steps": s.get("steps"), "eval": s.get("final_eval")}
r = {"max_abs_dw": dw, "max_abs_w": w, "rel": dw / w if w else None, "tol": tol,
     "one": ev(one), "other": ev(other)}
print(json.dumps(r))
sys.exit(0 if r["rel"] is not None and r["rel"] <= tol else 1)
EOF
}
step_dp() {
  local f rc=0 ngpu=0
  ours "$BIN" demo-assets --out "$DEMO" || return
  # DP_STEPS batches of 8 and one more (the run stops mid-epoch), 64 validation rows.
  for f in train.tsv:$((DP_STEPS * 8 + 8)) dev.tsv:64; do
    head -n $((${f#*:} + 1)) "$DEMO/data/${f%:*}" >"$WORK/cut" && mv "$WORK/cut" "$DEMO/data/${f%:*}"
  done
  dp_train one 1 || { FIG="the one-rank run failed"; return 1; }
  if [[ $MODE == gpu ]]; then
    dp_train gloo2 2 QLORA_DIST_CUDA_BACKEND=gloo || { FIG="2 ranks (Gloo on CUDA) failed"; return 1; }
  else
    dp_train gloo2 2 || { FIG="2 ranks (Gloo) failed"; return 1; }
  fi
  dp_compare gloo2 || rc=1
  cat "$WORK/dp-gloo2.json"
  [[ $MODE == gpu ]] && ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
  if ((ngpu >= 2)); then
    if dp_train nccl "$ngpu" && dp_compare nccl; then cat "$WORK/dp-nccl.json"; else rc=1; fi
  elif [[ $MODE == gpu ]]; then
    echo "one GPU: the N-GPU NCCL run needs at least 2 (not run)"
  fi
  FIG=$(report_py --figure dp)
  return "$rc"
}

# --- the run ---------------------------------------------------------------------------------
if [[ $MODE == record ]]; then
  DEADLINE=$(($(date +%s) + 300))
  record_fixtures "${GPU_FIXTURES_DIR:-$GPU/fixtures}"
  rc=$?
  rm -rf "$WORK"
  exit $rc
fi

say "gpu-check ($MODE), budget ${BUDGET}s, results in $OUT"
rm -f "$OUT/tests.txt" "$WORK/tests.status"
step preflight 40 step_preflight
if [[ ${S_STATUS[-1]} != PASS && ${GPU_CHECK_CONTINUE:-0} != 1 ]]; then
  STOP="preflight failed"
fi
step fixtures 60 step_fixtures
# shellcheck disable=SC2086 # each CUDA_TESTS entry is "executable test..."
step tests-nf4 45 step_tests ${CUDA_TESTS[0]}
# shellcheck disable=SC2086
step tests-optim 30 step_tests ${CUDA_TESTS[1]}
# shellcheck disable=SC2086
step tests-model 40 step_tests ${CUDA_TESTS[2]}
# shellcheck disable=SC2086
step tests-dist 30 step_tests ${CUDA_TESTS[3]}
step nf4-8b 5 step_nf4_8b
step --reserve 180 ckpt-8b 90 step_ckpt8b
step --reserve 130 train-8b 80 step_train8b
step --soft --reserve 80 ref-8b 80 step_ref8b
step kernels 30 step_kernels
step --soft --reserve 50 kernels-ref 40 step_kernels_ref
step dp 60 step_dp
step --soft train-8b-7g 60 step_train8b_7g

say "report"
if report_py --steps "$WORK/steps.tsv" >"$WORK/logs/report.log" 2>&1; then
  record report PASS 0 "summary.json, summary.md"
else
  print_failure "$WORK/logs/report.log"
  record report FAIL 0 "bench/gpu_report.py failed"
  FAILED=1
fi
cp "$WORK/logs/report.log" "$OUT/logs/"

total=$(($(date +%s) - START))
echo
printf '%-12s %-8s %7s  %s\n' step status seconds "key figure"
printf '%-12s %-8s %7s  %s\n' ------------ -------- ------- ----------
for i in "${!S_NAME[@]}"; do
  printf '%-12s %-8s %7s  %s\n' "${S_NAME[$i]}" "${S_STATUS[$i]}" "${S_SECS[$i]}" "${S_FIG[$i]}"
done
echo
echo "gpu-check ($MODE): $( ((FAILED)) && echo FAILED || echo passed) in ${total}s (budget ${BUDGET}s); results in $OUT"
if [[ $MODE == cpu && $FAILED == 0 && ${GPU_CHECK_KEEP:-0} != 1 ]]; then rm -rf "$WORK"; fi
# Let tee write the last lines before the exit status is seen.
exec >&- 2>&-
[[ -n $TEE_PID ]] && wait "$TEE_PID" 2>/dev/null
exit $FAILED
