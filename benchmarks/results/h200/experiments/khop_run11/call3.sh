#!/bin/bash
# Third device call of k-hop run 11 (2026-12-01, third session): call2.sh ran out of time (6 processes, 550 s each:
# every run was killed before writing its JSON). Here: p-hop seeds 0, 1 and one more k-hop state_norm seed (2): 3
# processes, 440 s each. Returns khop.tgz and phop.tgz (JSON, plot, log, training records; no weights).
# Run from the repository root:  OUT=<dir> bash benchmarks/results/h200/experiments/khop_run11/call3.sh
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W/khop $W/phop
{ timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv; python -c "import torch,sys;print(torch.__version__, sys.version)"; } > $W/env.txt 2>&1
T=${T:-440}
K="python -m open_mythos.cli experiment khop --preset gpu --no-progress --set model.state_norm=true"
P="python -m open_mythos.cli experiment p-hop --preset gpu --no-progress"
timeout $T $K --set seed=2 --out $W/khop/norm_s2 > $W/khop/norm_s2.log 2>&1 &
for s in 0 1; do
  timeout $T $P --set seed=$s --out $W/phop/phop_s$s > $W/phop/phop_s$s.log 2>&1 &
done
pack() { for d in khop phop; do (cd $W && timeout 60 tar czf $OUT/$d$1.tgz --exclude='*.safetensors' --exclude='*.pt' \
  --exclude='*checkpoint*' --exclude='*.distcp' env.txt gpu_util.txt $d 2>/dev/null); done; }
( while sleep 30; do timeout 10 nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $W/gpu_util.txt
  pack _partial; done ) &
TICK=$!
wait $(jobs -p | grep -v "^$TICK$") 2>/dev/null
kill $TICK 2>/dev/null; wait $TICK 2>/dev/null
pack "" && rm -f $OUT/*_partial.tgz
ls -la $OUT
for f in $W/*/*.log; do echo "== $f"; grep -E "^  (RDT|baseline|unrolled|guess)" $f | tail -14; tail -1 $f; done
