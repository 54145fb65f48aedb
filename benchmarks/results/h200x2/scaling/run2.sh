#!/bin/bash
# Issue 29, second round on nvidia-h200-x2 (sharded Muon, FSDP2, SPEC config, loss-curve noise, 1 -> 2 GPU resume):
# one command of at most ~9.3 minutes (BUDGET seconds), phases in priority order, each under `timeout`, results
# packed into $OUT after every phase (results.tgz: every variant's JSON and log; summary.json; run2.log).
#
#   OUT=DIR DATA=path/to/shakespeare bash benchmarks/results/h200x2/scaling/run2.sh     # from the repository root
#   SMOKE=1 OUT=/tmp/x DATA=../shared/data/shakespeare bash benchmarks/results/h200x2/scaling/run2.sh  # CPU dry run
#
# Phases (GPU0 and GPU1 at once where the work is independent; 2-GPU phases are torchrun, one process per GPU):
#   0  GPU0: shk_b32 (1 GPU fastest path: step_graph, batch 32), then spec_b8 (SPEC config, 1 GPU)
#      GPU1: loss curves only, three processes sharing the GPU (their tokens/s are not measurements):
#            shk_b64 (100 steps, checkpoint at 50), shk_b64_repeat (the same run again), shk_b64_accum2 (64 as 2 x 32)
#   1  2 GPUs DDP, step_graph: shk_ddp_b32 (strong, sharded Muon), shk_ddp_b32_noshard (strong, optim.shard_muon=false),
#      shk_ddp_b64 (weak, 100 steps: the 2-GPU loss curve)
#   2  2 GPUs FSDP2: shk_fsdp_b32 (strong), shk_fsdp_b64 (weak; with the end-of-run sample, which used to take minutes)
#   3  2 GPUs DDP: spec_ddp_b16 (SPEC weak), shk_resume_1to2 (shk_b64's step-50 checkpoint continued on 2 GPUs),
#      spec_ddp_b8 (SPEC strong)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH=$PWD/src OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/scaling2_out}; DATA=${DATA:-data/shakespeare}; WORK=${WORK:-/tmp/scaling2}; BUDGET=${BUDGET:-555}
RES=$WORK/res; R=$WORK/runs
[ -d "$DATA" ] || { echo "no shakespeare texts at DATA=$DATA (set DATA=path/to/shakespeare)"; exit 2; }
DATA=$(realpath "$DATA")
rm -rf "$WORK"; mkdir -p "$OUT" "$RES" "$R"
LOG=$OUT/run2.log; : > "$LOG"
if [ -n "${SMOKE:-}" ]; then  # the same phases on a CPU: tiny model, 4 steps, a checkpoint every 2
  S="@device='cpu'@compile=false@model.dim=32@model.n_heads=2@model.n_kv_heads=1@model.n_experts=4"
  S="$S@model.expert_dim=32@model.max_seq_len=32@model.lora_rank=2@model.max_output_tokens=16@data.seq_len=16@eval_batches=2@steps=4@ckpt_every=2"
  RSTEP=2; K=4; export OMP_NUM_THREADS=1  # timeouts x4 on a CPU
else
  S=""; RSTEP=50; K=1
fi
say() { echo "[$SECONDS s] $*" | tee -a "$LOG" >&2; }
# phase timeout: the phase's own (x K on a CPU), cut to what is left of the budget (15 s kept for the packing)
limit() { local t=$(($1 * K)) left=$((BUDGET * K - SECONDS - 15)); echo $((t < left ? t : left)); }
one() { local gpu=$1 t=$2 out=$3; shift 3; set -- "${@/%/$S}"
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 5 "$t" python3 benchmarks/scaling.py --data "$DATA" --runs "$R" \
    --out "$RES/$out.json" "$@" > "$RES/$out.log" 2>&1; }
two() { local t=$1 out=$2 port=$3; shift 3; set -- "${@/%/$S}"
  timeout -k 5 "$t" torchrun --nproc_per_node=2 --master_port="$port" benchmarks/scaling.py --data "$DATA" \
    --runs "$R" --out "$RES/$out.json" "$@" > "$RES/$out.log" 2>&1; }
pack() {
  say "phase $1 done"
  grep -h "tokens/s\|FAILED" "$RES"/*.log 2>/dev/null | grep -v Warning | tee -a "$LOG" > /dev/null
  local reports; reports=$(ls "$RES"/p*.json 2>/dev/null)
  [ -n "$reports" ] && python3 benchmarks/scaling.py --summarize $reports --out "$OUT/summary.json" > "$RES/summary.log" 2>&1
  tar czf "$OUT/results.tgz" -C "$WORK" res
}
run_phase() {  # run_phase N SECONDS: skip it when the budget has no room left for it
  local t; t=$(limit "$2"); [ "$t" -ge $((30 * K)) ] || { say "phase $1 skipped: $t s left"; return 1; }
  say "phase $1 (timeout $t s)"; echo "$t"
}
(nvidia-smi topo -m; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count())"
 ) > "$RES/env.txt" 2>&1

# 0: one GPU each -------------------------------------------------------------------------------------------
if t=$(run_phase 0 150); then
  one 0 "$t" p0_gpu0 shk_b32@shk@batch_size=32@steps=60 spec_b8@spec@batch_size=8@steps=30 &
  one 1 "$t" p0_b64 shk_b64@shk@batch_size=64@steps=100@ckpt_every=50 &
  one 1 "$t" p0_b64_repeat shk_b64_repeat@shk@batch_size=64@steps=100 &
  one 1 "$t" p0_b64_accum2 shk_b64_accum2@shk@batch_size=64@steps=100@grad_accum=2 &
  wait; pack 0
fi
# 1: two GPUs, DDP with the whole step as CUDA graphs: strong (sharded / unsharded Muon), weak --------------------
if t=$(run_phase 1 150); then
  two "$t" p1 29511 shk_ddp_b32@shk@batch_size=32@steps=40 \
    shk_ddp_b32_noshard@shk@batch_size=32@steps=40@optim.shard_muon=false \
    shk_ddp_b64@shk@batch_size=64@steps=100
  pack 1
fi
# 2: two GPUs, FSDP2 (the eager compiled step) ---------------------------------------------------------------
if t=$(run_phase 2 110); then
  two "$t" p2 29512 shk_fsdp_b32@shk@batch_size=32@steps=30@parallel=\'fsdp\' \
    shk_fsdp_b64@shk@batch_size=64@steps=30@parallel=\'fsdp\'@sample_tokens=300
  pack 2
fi
# 3: two GPUs: the SPEC config weak, the 1-GPU checkpoint resumed on 2, the SPEC config strong ---------------------
if t=$(run_phase 3 125); then
  two "$t" p3 29513 spec_ddp_b16@spec@batch_size=16@steps=30 \
    shk_resume_1to2@shk@batch_size=64@steps=100@resume_from=$R/shk_b64:$RSTEP \
    spec_ddp_b8@spec@batch_size=8@steps=30
  pack 3
fi
say "done"
