#!/bin/bash
# GPU call 4 (2026-12-01): issue 24's MLA decode A/B (the part call 3's budget skipped): before = 60befc0, after = this tree.
# R (optional): a suffix for a repeat round; the repeat runs after first, then before (ABBA over two rounds).
ROOT=$(pwd); B=$(mktemp -d)
tar -xzf benchmarks/results/h200/stage-api-ab/before_60befc0.tar.gz -C $B && cp -r src/open_mythos/data $B/src/open_mythos/
D="benchmarks/decode.py --attn mla --batch 1 16 --naive-tokens 2 --variants engine_graphs engine_depth"
S=$(date +%s)
if [ -n "${R:-}" ]; then
(cd $ROOT && PYTHONPATH=src timeout -k 5 80 python3 $D --out $OUT/decode_mla_after$R) > $OUT/decode_mla_after$R.log 2>&1; echo "after rc=$? $(( $(date +%s) - S )) s"
(cd $B && PYTHONPATH=src timeout -k 5 80 python3 $D --out $OUT/decode_mla_before$R) > $OUT/decode_mla_before$R.log 2>&1; echo "before rc=$? $(( $(date +%s) - S )) s"
else
(cd $B && PYTHONPATH=src timeout -k 5 80 python3 $D --out $OUT/decode_mla_before$R) > $OUT/decode_mla_before$R.log 2>&1; echo "before rc=$? $(( $(date +%s) - S )) s"
(cd $ROOT && PYTHONPATH=src timeout -k 5 80 python3 $D --out $OUT/decode_mla_after$R) > $OUT/decode_mla_after$R.log 2>&1; echo "after rc=$? $(( $(date +%s) - S )) s"
fi
for f in $OUT/*.log; do tail -n 3 $f; done
