#!/bin/bash
# Issue 27, items 4-5: train shakespeare-100m briefly, train its exit (halting unit), then measure per-token exit
# (held-out loss, mean loops, exit-depth histogram) and continuous depth batching vs static on it, in one call.
#   from the repository root, on one H200 (torch 2.11, no network):  OUT=/some/dir bash benchmarks/results/h200/trained-exit/gpu_call.sh
# Data: data/shakespeare or ../shared/data/shakespeare (the 37 works) if present, else the 6 shipped plays.
# Writes $OUT/log.txt, $OUT/trained_exit.json, $OUT/exit_depths.png, $OUT/results.tgz (run metrics, no weights).
set -u
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; W=/tmp/w_trained_exit; mkdir -p "$OUT" "$W"
STEPS=${STEPS:-600}; EXIT_STEPS=${EXIT_STEPS:-200}
if [ -d data/shakespeare ]; then DATA=(--set "data.path='data/shakespeare'")
elif [ -d ../shared/data/shakespeare ]; then DATA=(--set "data.path='../shared/data/shakespeare'")
else DATA=(--set "data.source='shakespeare'"); fi
echo "data: ${DATA[*]}" | tee "$OUT/log.txt"
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$OUT/log.txt"
t0=$(date +%s)
timeout 300 python -m open_mythos.cli train --preset shakespeare-100m "${DATA[@]}" --set steps=$STEPS \
    --set eval_every=0 --set sample_tokens=0 --set "sweep_loops=[1, 4, 16]" --set "out_dir='$W/run'" \
    --no-progress --overwrite > "$W/train.log" 2>&1
echo "train rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$OUT/log.txt"
grep -v "^ *[0-9]*%\|it/s" "$W/train.log" | tail -12 >> "$OUT/log.txt"
t1=$(date +%s)
timeout 330 python benchmarks/trained_exit.py --run "$W/run" --train-exit-steps $EXIT_STEPS --budget 16 \
    --eval-rows 64 --eval-len 128 --prompt-len 64 --requests 256 --max-batch 64 --prompt-tokens 64 --new-tokens 64 \
    --sync-every 1 4 --prefill-batch 1 64 --out "$OUT" > "$W/bench.log" 2>&1
echo "benchmark rc=$? $(( $(date +%s) - t1 )) s" | tee -a "$OUT/log.txt"
grep -v '^ \|^[{}]' "$W/bench.log" | tail -40 >> "$OUT/log.txt"
python - "$OUT/trained_exit.json" >> "$OUT/log.txt" 2>&1 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for k, v in r["held_out"].items():
    print(f"{k:>16}: loss {v['loss']:.4f} ({v.get('loss_vs_full_depth', 0):+.2%}), mean loops {v['mean_loops']:.2f}")
print("act choice:", r["act_choice"])
print("depth_batching_speedup_trained:", r["depth_batching_speedup_trained"])
PY
cd "$W" && tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.pt' .
cat "$OUT/log.txt"
