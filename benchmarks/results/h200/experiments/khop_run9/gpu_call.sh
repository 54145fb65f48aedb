#!/bin/bash
# Session 2026-12-01, GPU call 2: issue 27 (P=C=1 recipe: seed 1, max_sampled 16, P=C=2 reference) and issue 28
# (k-hop with the residual state and up to 16 loops; prefix sums with a 2-position attention window),
# all processes concurrently on one H200.
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv > $W/env.txt; python -c "import torch,sys;print(torch.__version__, sys.version)" >> $W/env.txt
E="python -m open_mythos.cli experiment"
DV="steps=600 eval_every=0 sample_tokens=0 data.source='stdlib' data.seq_len=512 batch_size=32 compile=false step_graph=false model.dim=512 model.n_heads=8 model.n_kv_heads=4 model.n_experts=16 model.expert_dim=512 model.lora_rank=8"
sets() { for s in "$@"; do printf -- "--set %s " "$s"; done; }
T=550
K="--set model.injection='residual' --set loops.max_sampled=16 --set loops.warmup_steps=500 --set eval.loops=[1,2,4,6,8,10,12,16,24,40]"
timeout $T $E khop --preset gpu --no-progress $K --out $W/khop_res16 > $W/khop_res16.log 2>&1 &
timeout $T $E khop --preset gpu --no-progress $K --set seed=1 --out $W/khop_res16_s1 > $W/khop_res16_s1.log 2>&1 &
timeout $T $E prefix-sums --preset gpu --no-progress --set model.attn_window=2 --out $W/ps_w2 > $W/ps_w2.log 2>&1 &
timeout $T $E prefix-sums --preset gpu --no-progress --set model.attn_window=2 --set "model.injection='residual'" --out $W/ps_w2_res > $W/ps_w2_res.log 2>&1 &
timeout $T $E prefix-sums --preset gpu --no-progress --set model.attn_window=2 --set data.task_args.depth_curriculum=true --out $W/ps_w2_curr > $W/ps_w2_curr.log 2>&1 &
timeout $T $E dense-vs-looped --preset gpu --no-progress --set model.prelude_layers=1 --set model.coda_layers=1 --set seed=1 --out $W/dvl_pc1_s1 > $W/dvl_pc1_s1.log 2>&1 &
timeout $T python -m open_mythos.cli train --preset shakespeare-100m --no-progress $(sets $DV) --set "sweep_loops=[1,2,4,8,16]" --set out_dir="'$W/looped_pln_pc2'" > $W/looped_pln_pc2.log 2>&1 &
timeout $T python -m open_mythos.cli train --preset shakespeare-100m --no-progress $(sets $DV) --set model.prelude_layers=1 --set model.coda_layers=1 --set loops.max_sampled=16 --set "sweep_loops=[1,2,4,8,16]" --set out_dir="'$W/looped_pln_pc1_max16'" > $W/looped_pln_pc1_max16.log 2>&1 &
( while sleep 45; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $W/gpu_util.txt;
  (cd $W && tar czf $OUT/partial.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' --exclude='*.distcp' . 2>/dev/null); done ) &
TAR=$!
wait $(jobs -p | grep -v $TAR) 2>/dev/null
sleep 1; kill $TAR 2>/dev/null
cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' --exclude='*.distcp' . && rm -f $OUT/partial.tgz
for f in $W/*.log; do echo "== $f"; grep -v "^ \+[0-9]" $f | grep -v "^step\|^rank" | tail -7; done
