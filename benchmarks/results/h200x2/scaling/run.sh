#!/bin/bash
# Issue 29's measurements on nvidia-h200-x2 in one machine start (README.md beside this says what came out).
# Run from the repository root with the shakespeare texts in data/shakespeare:  OUT=DIR bash .../run.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH=$PWD/src OMP_NUM_THREADS=8
OUT=${OUT:-/tmp/scaling_out}; RES=/tmp/res; R=/tmp/scaling_runs; mkdir -p $OUT $RES
cd benchmarks
S=${SMOKE:-} K=${TSCALE:-1}  # a CPU dry run of this script: overrides appended to every variant, timeouts scaled
one() { local gpu=$1 t=$(($2 * K)) out=$3; shift 3; set -- "${@/%/$S}"; CUDA_VISIBLE_DEVICES=$gpu timeout $t python3 scaling.py --data $OLDPWD/data/shakespeare --runs $R --out $RES/$out.json "$@" > $RES/$out.log 2>&1; }
two() { local t=$(($1 * K)) out=$2; shift 2; set -- "${@/%/$S}"; timeout $t torchrun --nproc_per_node=2 --master_port=29517 scaling.py --data $OLDPWD/data/shakespeare --runs $R --out $RES/$out.json "$@" > $RES/$out.log 2>&1; }
pack() { echo "== $1 done at $SECONDS s"; grep -h "tokens/s\|FAILED\|Error\|error" $RES/*.log | grep -v Warning | tail -40; tar czf $OUT/results.tgz -C /tmp res; }
(nvidia-smi topo -m; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count())") > $RES/env.txt 2>&1
# 1: one GPU each: the fastest 1-GPU path (step_graph) at the preset's batch; the 1-GPU curve at global batch 64
one 0 85 p1_gpu0 shk_b32@shk@batch_size=32@steps=60 &
one 1 85 p1_gpu1 shk_b64@shk@batch_size=64@steps=100@ckpt_every=50 &
wait; pack 1
# 2: two GPUs, shakespeare-100m: DDP (graphed) weak / strong, the 1-GPU checkpoint resumed on 2, FSDP2 weak / strong
two 150 p2 shk_ddp_b64@shk@batch_size=64@steps=100@ckpt_every=50 \
  shk_ddp_b32@shk@batch_size=32@steps=40 \
  shk_resume_1to2@shk@batch_size=64@steps=100@resume_from=$R/shk_b64:50 \
  shk_fsdp_b64@shk@batch_size=64@steps=40@parallel=\'fsdp\'@sample_tokens=300 \
  shk_fsdp_b32@shk@batch_size=32@steps=30@parallel=\'fsdp\'
pack 2
# 3: the 2-GPU checkpoint resumed on 1 GPU; the SPEC config's 1-GPU fastest path, then the 1-GPU eager compiled step
one 0 70 p3_gpu0 shk_resume_2to1@shk@batch_size=64@steps=100@resume_from=$R/shk_ddp_b64:50 &
one 1 70 p3_gpu1 spec_b8@spec@batch_size=8@steps=30 shk_b32_eager@shk@batch_size=32@steps=40@step_graph=false &
wait; pack 3
# 4: two GPUs, the SPEC config
two 85 p4 spec_ddp_b16@spec@batch_size=16@steps=30 spec_ddp_b8@spec@batch_size=8@steps=30 \
  spec_fsdp_b16@spec@batch_size=16@steps=20@parallel=\'fsdp\' spec_fsdp_b8@spec@batch_size=8@steps=20@parallel=\'fsdp\'
pack 4
