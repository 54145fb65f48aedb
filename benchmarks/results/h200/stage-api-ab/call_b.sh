#!/bin/bash
# GPU call B (2026-12-01, second session), every process alone on the GPU, in this order:
#   1. issue 24: GQA decode A/B, before = 60befc0 (before_60befc0.tar.gz), after = this tree, order B A A B
#      (benchmarks/decode.py --attn gqa --batch 1 16 --variants engine_graphs engine_depth)
#   2. issue 27 items 4-5: trained exit + depth batching on shakespeare-100m with one Prelude and one Coda layer and
#      loops sampled up to 16 (the dense-vs-looped recipe), 500 steps (trained-exit/gpu_call.sh)
#   3. issue 24: the compiled whole-step CUDA graph training step, before then after, if the budget allows
# Run from the repository root: OUT=<dir> bash benchmarks/results/h200/stage-api-ab/call_b.sh
ROOT=$(pwd); B=$(mktemp -d); S=$(date +%s); BUDGET=${BUDGET:-575}
left() { echo $(( BUDGET - ($(date +%s) - S) )); }
tar -xzf benchmarks/results/h200/stage-api-ab/before_60befc0.tar.gz -C $B && cp -r src/open_mythos/data $B/src/open_mythos/
mkdir -p $OUT/ab $OUT/exit
D="benchmarks/decode.py --attn gqa --batch 1 16 --naive-tokens 2 --variants engine_graphs engine_depth"
one() {  # one SIDE NAME CAP ARGS...
  local side=$1 name=$2 cap=$3; shift 3; local dir=$ROOT; [ $side = before ] && dir=$B
  (cd $dir && PYTHONPATH=src timeout -k 5 $cap python3 "$@" --out $OUT/ab/$name) > $OUT/ab/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - S )) s" | tee -a $OUT/ab/status.txt
}
one before decode_gqa_before_1 80 $D
one after decode_gqa_after_1 80 $D
one after decode_gqa_after_2 80 $D
one before decode_gqa_before_2 80 $D
E=$(( $(left) - 200 )); [ $E -gt 330 ] && E=330
echo "exit part gets $E s" | tee -a $OUT/ab/status.txt
OUT=$OUT/exit STEPS=500 EXIT_STEPS=200 DATA_DIR=data/shakespeare \
  TRAIN_SET="--set model.prelude_layers=1 --set model.coda_layers=1 --set loops.max_sampled=16" \
  BENCH_ARGS="--budget 16 --eval-rows 64 --eval-len 128 --prompt-len 64 --requests 256 --max-batch 64 --prompt-tokens 64 --new-tokens 64 --sync-every 1 4 --prefill-batch 64" \
  timeout $E bash benchmarks/results/h200/trained-exit/gpu_call.sh > $OUT/exit/stdout.txt 2>&1
echo "exit rc=$? at $(( $(date +%s) - S )) s" | tee -a $OUT/ab/status.txt
T="benchmarks/train_step.py --attn gqa --steps 6 --variants compiled_step_graph"
L=$(( ($(left) - 10) / 2 ))
if [ $L -ge 60 ]; then one before train_step_graph_before $L $T; one after train_step_graph_after $L $T
else echo "step graph A/B skipped: budget" | tee -a $OUT/ab/status.txt; fi
for f in $OUT/ab/*.log; do echo "== $f"; tail -n 4 $f; done
tail -30 $OUT/exit/stdout.txt
