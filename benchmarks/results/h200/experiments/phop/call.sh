#!/bin/bash
# Issue 28 (a), p-hop induction (Saunshi et al. 2025): one device call on one H200, three processes concurrently.
#   phop_s0, phop_s1: `mythos experiment p-hop --preset gpu` (one block looped 6 times, trained at 6 loops; the same
#                     model run once; the loop unrolled into 6 distinct layers), seeds 0 and 1
#   phop_prog_s0:     the same with the progressive loss (Bansal et al. 2022) over up to 12 loops instead of 6 fixed
# Run from the repository root:  OUT=<dir> bash benchmarks/results/h200/experiments/phop/call.sh
# Writes ONE file, $OUT/results.tgz (each run's phop.json, phop.png, log, training records; no weights).
# PROG=0 leaves out the progressive-loss run (two processes instead of three, if the three would not fit the call).
# CPU check of this script: OUT=/tmp/o PRESET=cpu T=300 bash benchmarks/results/h200/experiments/phop/call.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
PRESET=${PRESET:-gpu}
T=${T:-540}                       # seconds per process (the call's limit is 600; the final tar needs a few)
W=$(mktemp -d /tmp/phop.XXXX)
mkdir -p "$OUT"
{ timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv; timeout 60 python -c "import torch,sys;print(torch.__version__, sys.version)"; } > $W/env.txt 2>&1
E="python -m open_mythos.cli experiment p-hop --preset $PRESET --no-progress"
for s in 0 1; do
  timeout $T $E --set seed=$s --out $W/phop_s$s > $W/phop_s$s.log 2>&1 &
done
[ "${PROG:-1}" = 1 ] && timeout $T $E --set seed=0 --set "loops.schedule='progressive'" --set loops.max_sampled=12 \
  --set model.max_loop_iters=12 --out $W/phop_prog_s0 > $W/phop_prog_s0.log 2>&1 &
pack() { (cd $W && timeout 60 tar czf $OUT/$1 --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' \
  --exclude='*.distcp' . 2>/dev/null); }
( while sleep 45; do timeout 10 nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $W/gpu_util.txt 2>/dev/null
  pack partial.tgz; done ) &
TICK=$!
wait $(jobs -p | grep -v "^$TICK$") 2>/dev/null
kill $TICK 2>/dev/null; wait $TICK 2>/dev/null
pack results.tgz && rm -f $OUT/partial.tgz
for f in $W/*.log; do echo "== $f"; grep -E "^  (RDT|baseline|unrolled|guess)" $f | tail -14; tail -2 $f; done
for d in $W/phop*/; do [ -f $d/phop.json ] && timeout 60 python -c "
import json,sys; r=json.load(open(sys.argv[1]))
print(sys.argv[1], {k: r.get(k) for k in ('extrapolation_size','extrapolation_accuracy','trained_loops_accuracy',
      'baseline_extrapolation_accuracy','unrolled_extrapolation_accuracy','paper_accuracy','train_seconds')})" $d/phop.json; done
