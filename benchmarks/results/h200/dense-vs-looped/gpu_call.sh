#!/bin/bash
# GPU call 2: dense-vs-looped (GPU preset, new defaults: no loop embedding) with seeds 0 and 1, concurrently.
cd "$(dirname "$0")"
export PYTHONPATH=src PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W
for s in 0 1; do
  timeout 200 python -m open_mythos.cli experiment dense-vs-looped --preset gpu --set seed=$s --no-progress \
     --out $W/dvl_seed$s > $W/dvl_seed$s.log 2>&1 &
done
wait
for f in $W/*.log; do echo "== $f"; grep -v "^ \+[0-9]" $f | tail -8; done > $OUT/log.txt
cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='checkpoint*' .
