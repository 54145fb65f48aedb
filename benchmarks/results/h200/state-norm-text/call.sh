#!/bin/bash
# Session 2026-12-02, one device call: does model.state_norm (RMSNorm on the state after every loop, the k-hop
# fix of issue 28) help or hurt on text? All processes concurrently on one H200.
#   looped_sn_sS: the dense-vs-looped GPU preset's looped model with state_norm = true, seeds 0-2, trained alone
#                 (the preset's fixed-depth baselines do not depend on the loop's settings: compare with
#                 ../dense-vs-looped-recipe/preset_sS, same seed and data order);
#   abl_*:        `mythos experiment ablate --preset gpu` rows baseline, state_norm, residual, residual+state_norm,
#                 seeds 0 and 1 (the ablation preset at today's defaults).
# Run from the repository root:  OUT=<dir> bash benchmarks/results/h200/state-norm-text/call.sh  (needs data/shakespeare)
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv > $W/env.txt; python -c "import torch,sys;print(torch.__version__, sys.version)" >> $W/env.txt
DV="steps=600 eval_every=0 sample_tokens=0 data.source='stdlib' data.seq_len=512 batch_size=32 compile=false step_graph=false model.dim=512 model.n_heads=8 model.n_kv_heads=4 model.n_experts=16 model.expert_dim=512 model.lora_rank=8 model.prelude_layers=1 model.coda_layers=1 loops.max_sampled=16"
sets() { for s in "$@"; do printf -- "--set %s " "$s"; done; }
T=${T:-540}
for s in 0 1 2; do
  timeout $T python -m open_mythos.cli train --preset shakespeare-100m --no-progress $(sets $DV) --set model.state_norm=true \
    --set seed=$s --set "sweep_loops=[1,2,4,8,16]" --set out_dir="'$W/looped_sn_s$s'" > $W/looped_sn_s$s.log 2>&1 &
done
D="data.path='data/shakespeare'"
for s in 0 1; do
  for rows in baseline,state_norm residual,residual+state_norm; do
    timeout $T python -m open_mythos.cli experiment ablate --preset gpu --rows $rows --set "$D" --set seed=$s --no-progress \
      --out $W/abl_${rows//+/_}_s$s > $W/abl_${rows//+/_}_s$s.log 2>&1 &
  done
done
( while sleep 40; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $W/gpu_util.txt;
  grep -h '^{"row"' $W/abl*.log > $OUT/rows.jsonl 2>/dev/null; done ) &
MON=$!
wait $(jobs -p | grep -v $MON) 2>/dev/null
kill $MON 2>/dev/null
grep -h '^{"row"' $W/abl*.log > $OUT/rows.jsonl
cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' --exclude='model' .
for f in $W/*.log; do echo "== $f"; grep -v "^ \+[0-9]" $f | grep -v "^step\|^rank" | tail -6; done
