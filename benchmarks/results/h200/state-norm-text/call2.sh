#!/bin/bash
# Session 2026-12-02, second device call: the residual state with and without state_norm on the dense-vs-looped GPU
# preset (call.sh measured lti with state_norm there), seeds 0-2, all six processes concurrently on one H200.
# Run from the repository root:  OUT=<dir> bash benchmarks/results/h200/state-norm-text/call2.sh
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w2; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv > $W/env.txt; python -c "import torch,sys;print(torch.__version__, sys.version)" >> $W/env.txt
DV="steps=600 eval_every=0 sample_tokens=0 data.source='stdlib' data.seq_len=512 batch_size=32 compile=false step_graph=false model.dim=512 model.n_heads=8 model.n_kv_heads=4 model.n_experts=16 model.expert_dim=512 model.lora_rank=8 model.prelude_layers=1 model.coda_layers=1 loops.max_sampled=16"
sets() { for s in "$@"; do printf -- "--set %s " "$s"; done; }
T=${T:-300}
for s in 0 1 2; do
  for v in res res_sn; do
    X="--set model.injection='residual'"; [ $v = res_sn ] && X="$X --set model.state_norm=true"
    timeout $T python -m open_mythos.cli train --preset shakespeare-100m --no-progress $(sets $DV) $X \
      --set seed=$s --set "sweep_loops=[1,2,4,8,16]" --set out_dir="'$W/looped_${v}_s$s'" > $W/looped_${v}_s$s.log 2>&1 &
  done
done
( while sleep 30; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $W/gpu_util.txt;
  (cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' --exclude='model' . 2>/dev/null); done ) &
MON=$!
wait $(jobs -p | grep -v $MON) 2>/dev/null
kill $MON 2>/dev/null
cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' --exclude='model' .
for f in $W/*.log; do echo "== $f"; tail -2 $f | cut -c1-400; done
