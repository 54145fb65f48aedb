#!/bin/bash
# Issue 27, items 4-5: train shakespeare-100m briefly, train its exit (halting unit), then measure per-token exit
# (held-out loss, mean loops, exit-depth histogram) and continuous depth batching vs static on it, in one call.
#   from the repository root, on one H200 (torch 2.11, no network):  OUT=/some/dir bash benchmarks/results/h200/trained-exit/gpu_call.sh
# Data: $DATA_DIR, else data/shakespeare or ../shared/data/shakespeare (the 37 works) if present, else the 6 shipped
# plays (data.source='shakespeare'). Knobs: STEPS (600), EXIT_STEPS (200); PRESET, TRAIN_SET and BENCH_ARGS exist
# for the CPU check of this script (PRESET=shakespeare-tiny, tiny BENCH_ARGS).
# Writes $OUT/log.txt, $OUT/trained_exit.json, $OUT/exit_depths.png, $OUT/results.tgz (run metrics, no weights).
set -u
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; W=/tmp/w_trained_exit; mkdir -p "$OUT" "$W"
STEPS=${STEPS:-600}; EXIT_STEPS=${EXIT_STEPS:-200}
DATA_DIR=${DATA_DIR:-}
if [ -z "$DATA_DIR" ] && [ -d data/shakespeare ]; then DATA_DIR=data/shakespeare
elif [ -z "$DATA_DIR" ] && [ -d ../shared/data/shakespeare ]; then DATA_DIR=../shared/data/shakespeare; fi
if [ -n "$DATA_DIR" ]; then DATA=(--set "data.source='files'" --set "data.path='$DATA_DIR'")
else DATA=(--set "data.source='shakespeare'"); fi
echo "data: ${DATA[*]}" | tee "$OUT/log.txt"
{ nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "no GPU"; } | tee -a "$OUT/log.txt"
PY=$(command -v python3 || command -v python)
t0=$(date +%s)
timeout 300 "$PY" -m open_mythos.cli train --preset ${PRESET:-shakespeare-100m} "${DATA[@]}" --set steps=$STEPS \
    --set eval_every=0 --set sample_tokens=0 --set "sweep_loops=[1, 4, 16]" --set "out_dir='$W/run'" \
    ${TRAIN_SET:-} --no-progress --overwrite > "$W/train.log" 2>&1
echo "train rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$OUT/log.txt"
grep -v "^ *[0-9]*%\|it/s" "$W/train.log" | tail -12 >> "$OUT/log.txt"
t1=$(date +%s)
BENCH_ARGS=${BENCH_ARGS:-"--budget 16 --eval-rows 64 --eval-len 128 --prompt-len 64 --requests 256 --max-batch 64
    --prompt-tokens 64 --new-tokens 64 --sync-every 1 4 --prefill-batch 1 64"}
timeout 330 "$PY" benchmarks/trained_exit.py --run "$W/run" --train-exit-steps $EXIT_STEPS $BENCH_ARGS \
    --out "$OUT" > "$W/bench.log" 2>&1
echo "benchmark rc=$? $(( $(date +%s) - t1 )) s" | tee -a "$OUT/log.txt"
grep -v '^ \|^[{}]' "$W/bench.log" | tail -40 >> "$OUT/log.txt"
"$PY" - "$OUT/trained_exit.json" >> "$OUT/log.txt" 2>&1 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for k, v in r["held_out"].items():
    print(f"{k:>16}: loss {v['loss']:.4f} ({v.get('loss_vs_full_depth', 0):+.2%}), mean loops {v['mean_loops']:.2f}")
print("act choice:", r["act_choice"])
print("depth_batching_speedup_trained:", r["depth_batching_speedup_trained"])
PY
cd "$W" && tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.pt' .
cat "$OUT/log.txt"
