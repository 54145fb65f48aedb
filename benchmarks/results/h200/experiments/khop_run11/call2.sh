#!/bin/bash
# Second device call of k-hop run 11 (2026-12-01, third session), sharing one H200 with the p-hop runs (issue 28 (a)).
# The first call (call.sh) ran but its archive (weights included, > 16 MiB) did not come back; only its output tail
# did. This call repeats its state_norm runs without weights (except one model, for CPU probes) and adds p-hop
# seeds 0 and 1 (../phop/call.sh without the progressive run). 6 processes at once, each under `timeout`.
# Returns khop.tgz, phop.tgz (each run's JSON, plot, log, training records) and norm_s0_model.tgz.
# Run from the repository root:  OUT=<dir> bash benchmarks/results/h200/experiments/khop_run11/call2.sh
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W/khop $W/phop
{ timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv; python -c "import torch,sys;print(torch.__version__, sys.version)"; } > $W/env.txt 2>&1
T=${T:-550}
K="python -m open_mythos.cli experiment khop --preset gpu --no-progress --set model.state_norm=true"
ST20="--set data.task_args.statements=20 --set data.task_args.n_vars=32"
P="python -m open_mythos.cli experiment p-hop --preset gpu --no-progress"
for s in 0 1; do
  timeout $T $K --set seed=$s --out $W/khop/norm_s$s > $W/khop/norm_s$s.log 2>&1 &
  timeout $T $K $ST20 --set seed=$s --out $W/khop/norm_st20_s$s > $W/khop/norm_st20_s$s.log 2>&1 &
  timeout $T $P --set seed=$s --out $W/phop/phop_s$s > $W/phop/phop_s$s.log 2>&1 &
done
pack() { for d in khop phop; do (cd $W && timeout 60 tar czf $OUT/$d$1.tgz --exclude='*.safetensors' --exclude='*.pt' \
  --exclude='*checkpoint*' --exclude='*.distcp' env.txt gpu_util.txt $d 2>/dev/null); done; }
( while sleep 45; do timeout 10 nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $W/gpu_util.txt
  pack _partial; done ) &
TICK=$!
wait $(jobs -p | grep -v "^$TICK$") 2>/dev/null
kill $TICK 2>/dev/null; wait $TICK 2>/dev/null
pack "" && rm -f $OUT/*_partial.tgz
(cd $W/khop && timeout 60 tar czf $OUT/norm_s0_model.tgz norm_s0/rdt/model 2>/dev/null)
ls -la $OUT
for f in $W/*/*.log; do echo "== $f"; grep -E "^  (RDT|baseline|unrolled|guess)" $f | tail -14; tail -1 $f; done
