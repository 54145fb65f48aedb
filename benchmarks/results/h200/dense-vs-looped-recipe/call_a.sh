#!/bin/bash
# Session 2026-12-01 (second), GPU call A: seeds of the two research presets, all processes concurrently on one H200.
#   issue 27 item 3: `mythos experiment dense-vs-looped --preset gpu`, seeds 0, 1, 2
#   issue 28 (b):    `mythos experiment khop --preset gpu`, seeds 0-3 (with the converged-loops stopping rule), and
#                    seed 0 of a 20-statement variant (lower guessing baseline at 10 hops)
# Run from the repository root:  OUT=<dir> bash benchmarks/results/h200/dense-vs-looped-recipe/call_a.sh
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv > $W/env.txt; python -c "import torch,sys;print(torch.__version__, sys.version)" >> $W/env.txt
E="python -m open_mythos.cli experiment"
T=${T:-555}
for s in 0 1 2; do
  timeout $T $E dense-vs-looped --preset gpu --no-progress --set seed=$s --out $W/dvl_s$s > $W/dvl_s$s.log 2>&1 &
done
for s in 0 1 2 3; do
  timeout $T $E khop --preset gpu --no-progress --set seed=$s --out $W/khop_s$s > $W/khop_s$s.log 2>&1 &
done
timeout $T $E khop --preset gpu --no-progress --set data.task_args.statements=20 --set data.task_args.n_vars=32 \
  --out $W/khop_st20_s0 > $W/khop_st20_s0.log 2>&1 &
( while sleep 40; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $W/gpu_util.txt;
  (cd $W && tar czf $OUT/partial.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' --exclude='*.distcp' . 2>/dev/null); done ) &
TAR=$!
wait $(jobs -p | grep -v $TAR) 2>/dev/null
sleep 1; kill $TAR 2>/dev/null
cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' --exclude='*.distcp' . && rm -f $OUT/partial.tgz
for f in $W/*.log; do echo "== $f"; grep -v "^ \+[0-9]" $f | grep -v "^step\|^rank" | tail -8; done
