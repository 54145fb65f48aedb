#!/usr/bin/env bash
# Same-machine A/B of the stage-API refactor (issue 24) on one H200: BEFORE = 60befc0 (main just before the i24
# merge: its src/ and the benchmarks used here, in before_60befc0.tar.gz, the shipped corpus copied from this tree,
# where it is byte-identical), AFTER = the tree this runs from.
#
#   OUT=/some/empty/dir bash benchmarks/results/h200/stage-api-ab/gpu_ab.sh       # from the repo root
#
# In order, each process alone on the GPU unless said, each under `timeout`, the whole under BUDGET_S (default 290 s;
# BUDGET_S=560 leaves room for every part; a part that no longer fits is skipped and says so in status.txt):
#   1. training step, eager, GQA (benchmarks/train_step.py --variants eager, SPEC config, batch 8 x 1024, 8 loops):
#      before, after, after, before (ABBA: drift cancels, and each side's two runs show the run-to-run spread)
#   2. gpu_check.py, before and after at the same time (correctness only: its timings are not used)
#   3. MLA decode (benchmarks/decode.py --attn mla --batch 1 16 --variants engine_graphs engine_depth): before, after
#   4. training step compiled_step_graph, GQA (the fast path; compiles for ~1 min): before, after, if time is left
# Prints summary.json (tokens/s per side and run, after/before ratios, gpu_check passed, status of every process);
# $OUT gets summary.json and ab.tar.gz (every log and report). CPU check of the logic: PY=<stub> (see test).
set -u
: "${OUT:?set OUT to an empty output directory}"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(pwd)
BEFORE_TAR=${BEFORE_TAR:-$HERE/before_60befc0.tar.gz}
BUDGET_S=${BUDGET_S:-290}
MIN_S=${MIN_S:-20}   # a part given less than this is skipped
PY=${PY:-python3}
START=$(date +%s)
WORK=$(mktemp -d)
RES=$WORK/ab
mkdir -p "$RES" "$WORK/before" "$OUT"
[ -f "$ROOT/benchmarks/train_step.py" ] || { echo "run from the repository root" >&2; exit 2; }
tar -xzf "$BEFORE_TAR" -C "$WORK/before" || { echo "cannot extract $BEFORE_TAR" >&2; exit 2; }
cp -r "$ROOT/src/open_mythos/data" "$WORK/before/src/open_mythos/"
: > "$RES/status.txt"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# run NAME SIDE CAP_S SCRIPT ARGS...: one benchmark process in the SIDE tree (before / after), killed after
# min(CAP_S, the budget left - 5 s); its report goes to $RES/NAME/, its output to $RES/NAME.log
run() {
    local name=$1 side=$2 cap=$3
    shift 3
    local dir=$ROOT t s rc
    [ "$side" = before ] && dir=$WORK/before
    t=$(( $(left) - 5 ))
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt "$MIN_S" ]; then
        echo "$name skipped: budget" >> "$RES/status.txt"
        return
    fi
    s=$(date +%s)
    (cd "$dir" && PYTHONPATH=src timeout -k 5 "$t" $PY "$@" --out "$RES/$name") > "$RES/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc wall=$(( $(date +%s) - s ))s limit=${t}s" >> "$RES/status.txt"
}

TRAIN=(benchmarks/train_step.py --attn gqa --steps 6 --variants)
run train_eager_before_1 before 90 "${TRAIN[@]}" eager
run train_eager_after_1 after 90 "${TRAIN[@]}" eager
run train_eager_after_2 after 90 "${TRAIN[@]}" eager
run train_eager_before_2 before 90 "${TRAIN[@]}" eager

run gpu_check_before before 150 benchmarks/gpu_check.py &
run gpu_check_after after 150 benchmarks/gpu_check.py &
wait

DECODE=(benchmarks/decode.py --attn mla --batch 1 16 --naive-tokens 2 --variants engine_graphs engine_depth)
run decode_mla_before before 100 "${DECODE[@]}"
run decode_mla_after after 100 "${DECODE[@]}"

run train_step_graph_before before 120 "${TRAIN[@]}" compiled_step_graph
run train_step_graph_after after 120 "${TRAIN[@]}" compiled_step_graph

python3 - "$RES" > "$RES/summary.json" <<'EOF'
import json, statistics, sys
from pathlib import Path

res = Path(sys.argv[1])


def load(name, report):
    path = res / name / f"{report}.json"
    return json.loads(path.read_text()) if path.is_file() else None


summary = {"before": "60befc0", "after": "this tree", "status": (res / "status.txt").read_text().splitlines()}
train = {}
for variant, runs in (("eager", ("before_1", "after_1", "after_2", "before_2")),
                      ("compiled_step_graph", ("before", "after"))):
    prefix = "train_eager" if variant == "eager" else "train_step_graph"
    rows = {}
    for run in runs:
        r = load(f"{prefix}_{run}", "train_step")
        if r is not None:
            rows[run] = round(r["results"]["gqa"][variant]["tokens_per_s"])
    sides = {side: [v for k, v in rows.items() if k.startswith(side)] for side in ("before", "after")}
    entry = {"tokens_per_s": rows}
    if sides["before"] and sides["after"]:
        entry["after_over_before"] = round(statistics.median(sides["after"]) / statistics.median(sides["before"]), 4)
        entry["spread_within_side"] = {s: round((max(v) - min(v)) / min(v), 4) for s, v in sides.items() if len(v) > 1}
    train[variant] = entry
summary["train_step_gqa"] = train
checks = {side: load(f"gpu_check_{side}", "gpu_check") for side in ("before", "after")}
summary["gpu_check_passed"] = {side: (c or {}).get("passed") for side, c in checks.items()}
summary["gpu_check_failed_checks"] = {
    side: sorted(k for k, c in (r or {}).get("checks", {}).items()
                 if any(isinstance(v, (int, float)) and k2 not in ("limit", "graphed_steps") and v > c["limit"]
                        for k2, v in c.items()))
    for side, r in checks.items()}
decode = {}
for side in ("before", "after"):
    r = load(f"decode_mla_{side}", "decode")
    if r is not None:
        for batch, rows in r["results"]["mla"].items():
            for variant in ("engine_graphs", "engine_depth"):
                if variant in rows:
                    cell = decode.setdefault(f"{variant}_{batch}", {})
                    cell[side] = round(rows[variant]["tokens_per_s"], 1)
                    cell[f"{side}_tokens_equal_generate"] = rows[variant]["tokens_equal_generate"]
for cell in decode.values():
    if "before" in cell and "after" in cell:
        cell["after_over_before"] = round(cell["after"] / cell["before"], 4)
summary["decode_mla"] = decode
print(json.dumps(summary, indent=1))
EOF
cat "$RES/summary.json"
cp "$RES/summary.json" "$OUT/summary.json"
tar -czf "$OUT/ab.tar.gz" -C "$WORK" ab
echo "budget ${BUDGET_S}s, used $(( $(date +%s) - START ))s"
