#!/bin/bash
# Session 2026-12-01, GPU call 1: issue 28 (khop, prefix-sums) and issue 27 (dense-vs-looped recipe variants),
# all processes concurrently on one H200.
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv > $W/env.txt; python -c "import torch;print(torch.__version__)" >> $W/env.txt
E="python -m open_mythos.cli experiment"
DV="steps=600 eval_every=0 sample_tokens=0 data.source='stdlib' data.seq_len=512 batch_size=32 compile=false step_graph=false model.dim=512 model.n_heads=8 model.n_kv_heads=4 model.n_experts=16 model.expert_dim=512 model.lora_rank=8"
sets() { for s in "$@"; do printf -- "--set %s " "$s"; done; }
T=560
timeout $T $E khop --preset gpu --no-progress --out $W/khop_lti > $W/khop_lti.log 2>&1 &
timeout $T $E khop --preset gpu --no-progress --set "model.injection='residual'" --out $W/khop_res > $W/khop_res.log 2>&1 &
timeout $T $E prefix-sums --preset gpu --no-progress --out $W/ps > $W/ps.log 2>&1 &
timeout $T $E prefix-sums --preset gpu --no-progress --set data.task_args.depth_curriculum=true --out $W/ps_curr > $W/ps_curr.log 2>&1 &
timeout $T $E dense-vs-looped --preset gpu --no-progress --set "loops.schedule='fixed'" --out $W/dvl_fixed > $W/dvl_fixed.log 2>&1 &
timeout $T $E dense-vs-looped --preset gpu --no-progress --set "loops.schedule='fixed'" --set model.prelude_layers=1 --set model.coda_layers=1 --out $W/dvl_fixed_pc1 > $W/dvl_fixed_pc1.log 2>&1 &
timeout $T python -m open_mythos.cli train --preset shakespeare-100m --no-progress $(sets $DV) --set "loops.schedule='progressive'" --set loops.backprop=0 --set "sweep_loops=[1,2,4,6,8,16]" --set out_dir="'$W/looped_progressive'" > $W/looped_progressive.log 2>&1 &
timeout $T python -m open_mythos.cli train --preset shakespeare-100m --no-progress $(sets $DV) --set model.prelude_layers=1 --set model.coda_layers=1 --set "sweep_loops=[1,2,4,8,16]" --set out_dir="'$W/looped_pln_pc1'" > $W/looped_pln_pc1.log 2>&1 &
( while sleep 45; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $W/gpu_util.txt;
  (cd $W && tar czf $OUT/partial.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' --exclude='*.distcp' . 2>/dev/null); done ) &
TAR=$!
wait $(jobs -p | grep -v $TAR) 2>/dev/null
sleep 1; kill $TAR 2>/dev/null
cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' --exclude='*.distcp' . && rm -f $OUT/partial.tgz
for f in $W/*.log; do echo "== $f"; grep -v "^ \+[0-9]" $f | tail -6; done
