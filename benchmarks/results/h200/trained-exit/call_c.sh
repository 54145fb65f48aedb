#!/bin/bash
# GPU call C (2026-12-01, second session), issue 27 item 5, each process alone on the GPU: the P = C = 1 model of
# call B again (shakespeare-100m, one Prelude + one Coda layer, loops sampled up to 16, 500 steps, exit trained 200
# steps), then continuous depth batching vs static (1) with 128 rows and 512 requests, (2) with compiled stages, 64 rows.
# Run from the repository root: OUT=<dir> bash benchmarks/results/h200/trained-exit/call_c.sh
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/wc; mkdir -p $W; S=$(date +%s)
timeout 150 python3 -m open_mythos.cli train --preset shakespeare-100m --set "data.source='files'" \
  --set "data.path='data/shakespeare'" --set steps=500 --set eval_every=0 --set sample_tokens=0 \
  --set "sweep_loops=[1, 4, 16]" --set "out_dir='$W/run'" --set model.prelude_layers=1 --set model.coda_layers=1 \
  --set loops.max_sampled=16 --no-progress --overwrite > $W/train.log 2>&1
echo "train rc=$? at $(( $(date +%s) - S )) s" | tee $W/status.txt
C="benchmarks/trained_exit.py --run $W/run --train-exit-steps 200 --budget 16 --eval-rows 64 --eval-len 128 --prompt-len 64 --prompt-tokens 64 --new-tokens 64 --sync-every 1 --prefill-batch 64"
timeout 170 python3 $C --requests 512 --max-batch 128 --out $W/rows128 > $W/rows128.log 2>&1
echo "rows128 rc=$? at $(( $(date +%s) - S )) s" | tee -a $W/status.txt
(cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.pt' .)
L=$(( 540 - ($(date +%s) - S) ))
timeout $L python3 $C --requests 256 --max-batch 64 --compile --out $W/compiled > $W/compiled.log 2>&1
echo "compiled rc=$? at $(( $(date +%s) - S )) s" | tee -a $W/status.txt
(cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.pt' .)
for f in rows128 compiled; do grep -v "^ \|^[{}]" $W/$f.log | tail -12; done
