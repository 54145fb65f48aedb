#!/bin/bash
# Prepared 2026-12-02, NOT YET RUN (the session's device time was spent): the recipe options added for issue 27's
# ablation list — injection='parcae', loop_embed='learned', sandwich_norm — as single changes on the ablation GPU
# preset (two seeds, beside the baseline of the same seed) and, for the three, the dense-vs-looped GPU preset's
# looped model (seed 0, compare with ../dense-vs-looped-recipe/preset_s0). All processes concurrently on one H200;
# expected ~150-250 s (state-norm-text/call.sh: 7 such processes in 133 s).
# Run from the repository root:  OUT=<dir> bash benchmarks/results/h200/loop-ablation-2/call.sh  (needs data/shakespeare)
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w3; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv > $W/env.txt; python -c "import torch,sys;print(torch.__version__, sys.version)" >> $W/env.txt
T=${T:-500}
D="data.path='data/shakespeare'"
for s in 0 1; do
  for rows in baseline,parcae loop_embed_learned,sandwich_norm; do
    timeout $T python -m open_mythos.cli experiment ablate --preset gpu --rows $rows --set "$D" --set seed=$s --no-progress \
      --out $W/abl_${rows//,/_}_s$s > $W/abl_${rows//,/_}_s$s.log 2>&1 &
  done
done
DV="steps=600 eval_every=0 sample_tokens=0 data.source='stdlib' data.seq_len=512 batch_size=32 compile=false step_graph=false model.dim=512 model.n_heads=8 model.n_kv_heads=4 model.n_experts=16 model.expert_dim=512 model.lora_rank=8 model.prelude_layers=1 model.coda_layers=1 loops.max_sampled=16"
sets() { for s in "$@"; do printf -- "--set %s " "$s"; done; }
for v in "injection='parcae'" "loop_embed='learned'" "sandwich_norm=true"; do
  name=$(echo $v | cut -d= -f1)
  timeout $T python -m open_mythos.cli train --preset shakespeare-100m --no-progress $(sets $DV) --set "model.$v" \
    --set "sweep_loops=[1,2,4,8,16]" --set out_dir="'$W/looped_$name'" > $W/looped_$name.log 2>&1 &
done
( while sleep 30; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $W/gpu_util.txt;
  grep -H '^{"row"' $W/abl*.log > $OUT/rows.txt 2>/dev/null; done ) &
MON=$!
wait $(jobs -p | grep -v $MON) 2>/dev/null
kill $MON 2>/dev/null
grep -H '^{"row"' $W/abl*.log > $OUT/rows.txt
cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*checkpoint*' --exclude='model' .
for f in $W/*.log; do echo "== $f"; tail -2 $f | cut -c1-400; done
