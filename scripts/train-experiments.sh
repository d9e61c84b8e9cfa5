#!/usr/bin/env bash
# One of issue 3's time-boxed training experiments (BENCHMARKS.md "What learns fastest"):
#   scripts/train-experiments.sh BIN CORPUS OUT_DIR SECONDS NAME [TRAIN FLAGS...]
# Every configuration gets the same step time: a 24-step probe measures its seconds per step
# over its last 12 steps (the first steps are slower: allocation, page faults),
# the run gets the steps that fit (so its learning-rate schedule completes), then its EMA
# weights are exported and scored with `chardiff eval` (256 samples of 96 characters, 50 DDIM
# steps, td 1, seed 0). One line per run goes to OUT_DIR/summary.jsonl; a finished run is
# skipped.
set -euo pipefail
bin=$1 corpus=$2 out=$3 budget=$4 name=$5
shift 5
mkdir -p "$out"
common=(--corpus "$corpus" --preprocess reference --window 96 --heads 4 --activation silu
        --attention-bias relative --lr 2e-3 --warmup 50 --ema-decay 0.995
        --sample-steps 50 --sample-td 1)

seconds_per_step() { # metrics.jsonl of the probe -> mean step time between its two records
  python3 -c 'import json,sys; a,b=[json.loads(l) for l in open(sys.argv[1])][-2:]; print((b["seconds"]-a["seconds"])/(b["step"]-a["step"]))' "$1"
}

dir=$out/$name
[ -f "$dir/eval.json" ] && exit 0
rm -rf "$dir" "$out/probe"
"$bin" train "${common[@]}" --out "$out/probe" --steps 24 --eval-every 12 \
    --checkpoint-every 1000 "$@" > "$out/probe.log" 2>&1
steps=$(python3 -c "print(int($budget / $(seconds_per_step "$out/probe/metrics.jsonl")))")
"$bin" train "${common[@]}" --out "$dir" --steps "$steps" --eval-every $((steps / 4)) \
    --checkpoint-every "$steps" "$@" > "$dir.log" 2>&1
"$bin" export "$dir" --out "$dir/model.onnx" --steps 50 --td 1 >> "$dir.log" 2>&1
"$bin" eval --corpus "$corpus" --preprocess reference --model "$dir/model.onnx" -n 256 \
    --steps 50 --td 1 --json > "$dir/eval.json" 2>> "$dir.log"
python3 - "$name" "$dir" "$*" "$budget" >> "$out/summary.jsonl" <<'EOF'
import json, sys
name, dir, flags, budget = sys.argv[1:]
metrics = [json.loads(l) for l in open(f"{dir}/metrics.jsonl")]
last, q = metrics[-1], json.load(open(f"{dir}/eval.json"))["samples"]
print(json.dumps({"run": name, "flags": flags, "budget": int(budget), "steps": last["step"],
                  "seconds": round(last["seconds"]), "tokens": last["tokens"],
                  "val_loss": [round(m["val_loss"], 4) for m in metrics],
                  "word_rate": round(q["word_rate"], 3), "char_entropy": round(q["char_entropy"], 3),
                  "distinct_2": round(q["distinct_2"], 3)}))
EOF
