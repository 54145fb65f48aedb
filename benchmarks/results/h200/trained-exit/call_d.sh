#!/bin/bash
# Prepared 2026-12-01 (third session), run 2026-12-02 (SEED 0 and 1): issue 27 item 5 on a longer workload. Call C's whole-run ratios
# were held down by the drain (256-512 requests: once no request waits, rows empty one by one); 1,024 requests make
# the drain a smaller share. Also budget 32 (2x the trained maximum of 16: loss is flat there, item 3), where a
# static batch waits for its deepest token of up to 32 loops. Each process alone on the GPU, as in call C.
# Run from the repository root: OUT=<dir> bash benchmarks/results/h200/trained-exit/call_d.sh   (needs data/shakespeare:
# copy ../shared/data/shakespeare there first; delete it before committing)
export PYTHONPATH=src PYTHONUNBUFFERED=1
SEED=${SEED:-0}   # the training seed
W=/tmp/wd; mkdir -p $W; S=$(date +%s)
{ timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch,sys;print(torch.__version__, sys.version)"; } > $W/env.txt 2>&1
pack() { (cd $W && timeout 60 tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.pt' .); }
timeout 150 python3 -m open_mythos.cli train --preset shakespeare-100m --set "data.source='files'" \
  --set "data.path='data/shakespeare'" --set steps=500 --set eval_every=0 --set sample_tokens=0 \
  --set "sweep_loops=[1, 4, 16]" --set "out_dir='$W/run'" --set model.prelude_layers=1 --set model.coda_layers=1 \
  --set loops.max_sampled=16 --set seed=$SEED --no-progress --overwrite > $W/train.log 2>&1
echo "train rc=$? at $(( $(date +%s) - S )) s" | tee $W/status.txt
mkdir -p $W/run_exit && cp $W/run/train_config.json $W/run_exit/
C="benchmarks/trained_exit.py --eval-rows 64 --eval-len 128 --prompt-len 64 --prompt-tokens 64 --new-tokens 64 --sync-every 1 --prefill-batch 64 --requests 1024 --max-batch 64 --act-thresholds 0.99"
timeout 200 python3 $C --run $W/run --train-exit-steps 200 --budget 16 --save-model $W/run_exit/model --out $W/b16 > $W/b16.log 2>&1
echo "budget 16 rc=$? at $(( $(date +%s) - S )) s" | tee -a $W/status.txt; pack
L=$(( 545 - ($(date +%s) - S) ))
timeout $L python3 $C --run $W/run_exit --budget 32 --out $W/b32 > $W/b32.log 2>&1
echo "budget 32 rc=$? at $(( $(date +%s) - S )) s" | tee -a $W/status.txt; pack
for f in b16 b32; do grep -v "^ \|^[{}]" $W/$f.log | tail -8; done
