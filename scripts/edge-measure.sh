#!/usr/bin/env bash
# The edge figures of BENCHMARKS.md for one chardiff binary:
#   scripts/edge-measure.sh BIN [--model FILE]
# stripped size; start-up (process start to exit of a 1-step, 1-sample run: load + one denoising
# step, median of 11); wall time and peak RSS of sampling 8 x 96 characters at the model's
# recommended steps (GNU time).
set -euo pipefail
bin=$1; shift
stripped=$(mktemp); strip -o "$stripped" "$bin"
printf 'binary %s: %.1f MB stripped\n' "$bin" "$(stat -c %s "$stripped" | awk '{print $1/1e6}')"
rm -f "$stripped"
"$bin" sample "$@" -n 1 --steps 1 > /dev/null # warm the page cache
for _ in $(seq 11); do
  s=$(date +%s%N); "$bin" sample "$@" -n 1 --steps 1 > /dev/null; e=$(date +%s%N)
  echo $(( (e - s) / 1000 ))
done | sort -n | sed -n 6p | awk '{printf "start-up to first denoising step done: %.1f ms (median of 11)\n", $1/1000}'
/usr/bin/time -f 'sample -n 8 (recommended steps): %e s wall, peak RSS %M KB' "$bin" sample "$@" -n 8 > /dev/null
