#!/bin/bash
# GPU call 1: the recurrence ablation (dim 256, 400 steps each, 2 rows per process, 10 processes) and
# dense-vs-looped (dim 512, stdlib) for the candidate recipe and for today's defaults, all concurrently.
cd "$(dirname "$0")"
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W
python -c "import torch,sys,sysconfig;print(torch.__version__, torch.version.cuda, sys.version, sysconfig.get_paths()['stdlib'])" > $OUT/log.txt 2>&1
nvidia-smi -L >> $OUT/log.txt
D="data.path='data/shakespeare'"
i=0
for rows in baseline,one_loop loop_embed_0,loop_embed_0.02 residual,state_embed state_random,init_loops_1 \
            no_out_norm,lora_0 dense_ffn,lr_half lr_double,fixed_loops uniform_loops,full_backprop \
            residual+state_embed,residual+state_embed+loop_embed_0 residual+state_embed+loop_embed_0+init_loops_1; do
  i=$((i+1))
  timeout 470 python -m open_mythos.cli experiment ablate --preset gpu --rows $rows --set "$D" --no-progress \
     --out $W/abl$i > $W/abl$i.log 2>&1 &
done
timeout 470 python -m open_mythos.cli experiment ablate --preset gpu --rows baseline --set "$D" --set seed=1 \
   --no-progress --out $W/abl_seed1 > $W/abl_seed1.log 2>&1 &
R="--set model.injection='residual' --set model.state_init='embed' --set model.loop_embed_scale=0.0"
timeout 470 python -m open_mythos.cli experiment dense-vs-looped --preset gpu $R --no-progress --out $W/dvl_recipe \
   > $W/dvl_recipe.log 2>&1 &
timeout 470 python -m open_mythos.cli experiment dense-vs-looped --preset gpu --no-progress --out $W/dvl_default \
   > $W/dvl_default.log 2>&1 &
while [ -n "$(jobs -r)" ]; do sleep 20; grep -h '^{"row"' $W/*.log > $OUT/rows.jsonl; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $OUT/log.txt; done
wait
grep -h '^{"row"' $W/*.log > $OUT/rows.jsonl
for f in $W/*.log; do echo "== $f"; grep -v '^{"row"' $f | tail -25; done >> $OUT/log.txt
cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='ckpt*' --exclude='checkpoint*' .
ls -la $OUT
