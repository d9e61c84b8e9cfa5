#!/usr/bin/env bash
# The on-GPU check of the CUDA path (parity with the CPU plan, then step latency beside the CPU).
#
# Build the binary on a machine with cargo, then run this script where the GPU is:
#   cargo build --release --features cuda && mkdir -p dist && cp target/release/chardiff dist/chardiff-cuda
#   scripts/gpu-check.sh [MODEL]        # BIN=... to use another binary, OUT=... for the report folder
# It needs an NVIDIA driver for CUDA >= 13.0, libcudart, libnvrtc, libcublas and libcudnn (found in
# PyTorch's site-packages under nvidia/*/lib when there is no system install), and the CUDA headers
# (CUDA_HOME, default /usr/local/cuda) for the kernels tract compiles at run time.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-dist/chardiff-cuda}
MODEL=${1:-models/default.onnx}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"

for site in $(python3 -c 'import site, sys; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
  for lib in "$site"/nvidia/*/lib; do
    [ -d "$lib" ] && LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  lscpu | grep -E "Model name|^CPU\(s\)" 2>&1
} | tee "$OUT/machine.txt"

status=0
echo "== parity: CUDA plan vs CPU plan (f32) =="
"$BIN" parity --model "$MODEL" --device cuda --batch 1,64 --steps 50 --seed 7 2>&1 | tee "$OUT/parity.txt" || status=1

echo "== latency: CUDA =="
"$BIN" bench --model "$MODEL" --device cuda --batch 1,64,1024 --iterations 50 --json 2>&1 | tee "$OUT/bench-cuda.json" || status=1
echo "== latency: CPU (1 thread) =="
"$BIN" bench --model "$MODEL" --device cpu --batch 1,64 --iterations 20 --json 2>&1 | tee "$OUT/bench-cpu.json" || status=1
exit $status
