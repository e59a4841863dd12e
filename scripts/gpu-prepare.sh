#!/usr/bin/env bash
# Prepares .gpu/ for scripts/gpu-check.sh on a GPU machine that has Python + torch but no
# cargo: builds here (CUDA kernels are compiled by build.rs whenever nvcc is found) and copies
# what the check needs into .gpu/ (git-ignored, like .whl/):
#   .gpu/bin/         qlora-cls, bench_kernels and the test executables (nf4, optim, model,
#                     dist), stripped; cuobjdump (the preflight's sm_90 check) when the venv
#                     has one
#   .gpu/lib/         shared libraries they need that are neither torch's, the pip CUDA
#                     runtime's nor the system's (the C library, libstdc++, libgcc_s: the GPU
#                     machine's own must win, or its python and nvidia-smi break)
#   .gpu/fixtures/    the oracle fixtures the CUDA tests need, recorded here through
#                     `scripts/gpu-check.sh --record-fixtures` (our transformers/peft/
#                     bitsandbytes; the GPU machine's differ), replayed there
#   .gpu/target_tmpdir the CARGO_TARGET_TMPDIR baked into the test executables
#   .gpu/site/        bitsandbytes 0.50.2 (the reference stack's missing piece there), pruned
#                     to its CPU and CUDA 13.0 libraries
#   .gpu/shared/      the MRPC files (../shared does not travel to the device machine)
#   .gpu/manifest_dir the CARGO_MANIFEST_DIR baked into the test executables
#   .gpu/torch_version the torch and CUDA versions the executables were linked against
# Usage: scripts/gpu-prepare.sh [--no-wheel]; then carry `.gpu` and run
# `bash scripts/gpu-check.sh` (see bench/README.md). Everything must fit the 64 MiB that
# travels: the script prints the total.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${QLORA_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
export PATH="$VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1 QLORA_VENV="$VENV"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SHARED=${QLORA_SHARED:-$ROOT/../shared}
WHEEL=1
[[ "${1:-}" == "--no-wheel" ]] && WHEEL=0
TESTS=(nf4 optim model dist)
GPU=$ROOT/.gpu

rm -rf "$GPU"
mkdir -p "$GPU/bin" "$GPU/lib" "$GPU/shared/data/mrpc"

echo "== building (release) the binary, bench_kernels and the test executables"
cargo build --release --bin qlora-cls --example bench_kernels ${CARGO_ARGS:-}
cp "$TARGET/release/qlora-cls" "$TARGET/release/examples/bench_kernels" "$GPU/bin/"
test_args=()
for t in "${TESTS[@]}"; do
  [[ -f tests/$t.rs ]] && test_args+=(--test "$t") || echo "note: tests/$t.rs does not exist here, skipped"
done
# The executables' paths come from cargo's JSON messages (their names carry a hash).
cargo test --release --no-run ${CARGO_ARGS:-} "${test_args[@]}" --message-format=json 2>/dev/null |
  "$PY" -c '
import json, shutil, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy2(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
        print("  test executable:", m["target"]["name"])
' "$GPU/bin"
strip "$GPU"/bin/* 2>/dev/null || true
echo "$ROOT" >"$GPU/manifest_dir"
echo "$TARGET/tmp" >"$GPU/target_tmpdir"
# The libtorch these executables were linked against: gpu-check.sh refuses another one.
"$PY" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda)' >"$GPU/torch_version"
echo "  built against torch $(cat "$GPU/torch_version")"

echo "== shared libraries not provided by torch or the C library"
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
for exe in "$GPU"/bin/*; do
  ldd "$exe" | awk '/=> \// {print $3}'
done | sort -u | while read -r lib; do
  case "$lib" in
    "$torch_lib"/*|*/nvidia/*) ;;               # torch's own and the pip CUDA runtime: there too
    */libc.so*|*/libm.so*|*/libdl.so*|*/libpthread.so*|*/librt.so*|*/libutil.so*|*/ld-linux*) ;;
    */libstdc++.so*|*/libgcc_s.so*|*/libgomp.so*) ;;  # the system's (or torch's) there
    *) cp -L "$lib" "$GPU/lib/" && echo "  $lib" ;;
  esac
done

# cuobjdump (a static executable) for the preflight's `--list-elf` sm_90 check: the pip nvcc
# package or triton carries one; the GPU machine may have none.
cuobjdump=$(command -v cuobjdump || find "$VENV/lib" -path '*/bin/cuobjdump' -type f 2>/dev/null | head -1)
if [[ -n $cuobjdump ]]; then
  cp "$cuobjdump" "$GPU/bin/cuobjdump" && echo "  cuobjdump from $cuobjdump"
else
  echo "  note: no cuobjdump here (nvidia-cuda-nvcc); gpu-check.sh will skip the sm_90 check"
fi

echo "== oracle fixtures for the CUDA tests (recorded by running their CPU twins here)"
GPU_FIXTURES_DIR="$GPU/fixtures" bash scripts/gpu-check.sh --record-fixtures

cp "$SHARED/data/mrpc/train.tsv" "$SHARED/data/mrpc/dev.tsv" "$GPU/shared/data/mrpc/"

if [[ $WHEEL == 1 ]]; then
  echo "== bitsandbytes 0.50.2 for the reference stack (the GPU image lacks it)"
  mkdir -p .whl
  if ! ls .whl/bitsandbytes-0.50.2-*.whl >/dev/null 2>&1; then
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2
  fi
  "$PY" -m pip install -q --no-deps --no-compile --target "$GPU/site" .whl/bitsandbytes-0.50.2-*.whl
  # Keep the CPU and CUDA 13.0 libraries only (the wheel carries one per CUDA/ROCm/XPU version).
  find "$GPU/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
fi

echo "== .gpu/ is $(du -sh "$GPU" | cut -f1) (the device machine takes 64 MiB in all)"
du -sh "$GPU"/* | sed 's/^/  /'
kib=$(du -sk "$GPU" | cut -f1)
if ((kib > 62 * 1024)); then
  echo "warning: .gpu is over 62 MiB: with the working tree it may not fit the 64 MiB that travels" >&2
fi
