#!/bin/bash
# Session 2026-12-02, issue 27 item 5: call D's budget-16 measurement (seed 0, 1,024 requests) with the engine's
# stages compiled (Engine(compile=True): each stage's small kernels fused, then captured as CUDA graphs).
# Run from the repository root: OUT=<dir> bash benchmarks/results/h200/trained-exit/call_e.sh   (needs data/shakespeare)
export PYTHONPATH=src PYTHONUNBUFFERED=1
SEED=0
W=/tmp/wd; mkdir -p $W; S=$(date +%s)
{ timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch,sys;print(torch.__version__, sys.version)"; } > $W/env.txt 2>&1
pack() { (cd $W && timeout 60 tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.pt' .); }
timeout 150 python3 -m open_mythos.cli train --preset shakespeare-100m --set "data.source='files'" \
  --set "data.path='data/shakespeare'" --set steps=500 --set eval_every=0 --set sample_tokens=0 \
  --set "sweep_loops=[1, 4, 16]" --set "out_dir='$W/run'" --set model.prelude_layers=1 --set model.coda_layers=1 \
  --set loops.max_sampled=16 --set seed=$SEED --no-progress --overwrite > $W/train.log 2>&1
echo "train rc=$? at $(( $(date +%s) - S )) s" | tee $W/status.txt
C="benchmarks/trained_exit.py --eval-rows 64 --eval-len 128 --prompt-len 64 --prompt-tokens 64 --new-tokens 64 --sync-every 1 --prefill-batch 64 --requests 1024 --max-batch 64 --act-thresholds 0.99 --compile"
L=$(( 560 - ($(date +%s) - S) ))
timeout $L python3 $C --run $W/run --train-exit-steps 200 --budget 16 --out $W/b16c > $W/b16c.log 2>&1
echo "budget 16 compiled rc=$? at $(( $(date +%s) - S )) s" | tee -a $W/status.txt; pack
grep -v "^ \|^[{}]" $W/b16c.log | tail -8
