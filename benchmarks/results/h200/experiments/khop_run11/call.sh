#!/bin/bash
# Issue 28 (b), run 11, first call (run 2026-12-01 06:40 UTC; see README.md): does a fixed-scale state (model.state_norm) stop
# the k-hop stall beyond ~7 hops (run 10), and does the 20-statement format (no 10-hop shortcut) change the picture?
# All processes concurrently on one H200, each under `timeout`; weights kept (0.74M parameters each) so the runs can
# be probed on a CPU afterwards; everything in ONE archive $OUT/results.tgz (the device returns at most 8 files).
# Run from the repository root:  OUT=<dir> bash benchmarks/results/h200/experiments/khop_run11/call.sh
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv > $W/env.txt; python -c "import torch,sys;print(torch.__version__, sys.version)" >> $W/env.txt
E="python -m open_mythos.cli experiment khop --preset gpu --no-progress"
T=${T:-555}
N="--set model.state_norm=true"
R="--set model.state_norm=false"  # the preset has state_norm since this run
ST20="--set data.task_args.statements=20 --set data.task_args.n_vars=32"
for s in 0 1; do
  timeout $T $E $R --set seed=$s --out $W/res_s$s > $W/res_s$s.log 2>&1 &
  timeout $T $E $N --set seed=$s --out $W/norm_s$s > $W/norm_s$s.log 2>&1 &
  timeout $T $E $N $ST20 --set seed=$s --out $W/norm_st20_s$s > $W/norm_st20_s$s.log 2>&1 &
done
timeout $T $E $R $ST20 --set seed=0 --out $W/res_st20_s0 > $W/res_st20_s0.log 2>&1 &
( while sleep 40; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $W/gpu_util.txt;
  (cd $W && tar czf $OUT/partial.tgz --exclude='*checkpoint*' --exclude='*.distcp' . 2>/dev/null); done ) &
TAR=$!
wait $(jobs -p | grep -v $TAR) 2>/dev/null
sleep 1; kill $TAR 2>/dev/null
cd $W && tar czf $OUT/results.tgz --exclude='*checkpoint*' --exclude='*.distcp' . && rm -f $OUT/partial.tgz
for f in $W/*.log; do echo "== $f"; grep "RDT\|baseline  \|guess" $f | tail -6; done
