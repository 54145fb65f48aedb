#!/bin/bash
# GPU call 3 (2026-12-01): issue 24's before/after A/B, then issue 27's trained exit + depth batching, one after the other.
set -u
ROOT=$(pwd)
mkdir -p $OUT/ab $OUT/exit
S=$(date +%s)
OUT=$OUT/ab BUDGET_S=185 bash benchmarks/results/h200/stage-api-ab/gpu_ab.sh > $OUT/ab/stdout.txt 2>&1
echo "A/B done after $(( $(date +%s) - S )) s"
tail -60 $OUT/ab/stdout.txt
cd $ROOT
LEFT=$(( 545 - ($(date +%s) - S) ))
echo "exit part gets $LEFT s"
OUT=$OUT/exit STEPS=500 EXIT_STEPS=200 DATA_DIR=data/shakespeare \
  BENCH_ARGS="--budget 16 --eval-rows 64 --eval-len 128 --prompt-len 64 --requests 256 --max-batch 64 --prompt-tokens 64 --new-tokens 64 --sync-every 4 --prefill-batch 64" \
  timeout $LEFT bash benchmarks/results/h200/trained-exit/gpu_call.sh > $OUT/exit/stdout.txt 2>&1
echo "exit rc=$? after $(( $(date +%s) - S )) s"
tail -30 $OUT/exit/stdout.txt
