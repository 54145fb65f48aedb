"""Inside the recurrent block: MoE routing with aux-loss-free balancing, and depth-wise LoRA.

1. Route a batch, look at the expert load, take a few router-bias steps on a skewed router and
   watch the load even out (the bias is used for selection only, never for the gate values).
2. Depth-wise LoRA: each loop index t has its own low-rank adapter U_t D_t; give them values and
   the same input gets a different delta at every loop (loops past max_loop_iters reuse the last).
"""

import torch

from open_mythos import MythosConfig
from open_mythos.moe import MoE
from open_mythos.recurrence import DepthLoRA

torch.manual_seed(0)
cfg = MythosConfig(dim=64, n_experts=8, n_experts_per_tok=2, expert_dim=32, n_shared_experts=1)
moe = MoE(cfg).train()
for p in moe.parameters():
    torch.nn.init.normal_(p, std=0.05)
with torch.no_grad():
    moe.router.weight[0] += 0.5  # a skewed router: expert 0 is everyone's favourite
x = torch.randn(512, 64) + 0.5
for step in range(301):
    with torch.no_grad():
        moe(x)
    load = moe.update_router_bias(rate=0.01)
    if step % 100 == 0:
        print(f"step {step:3d}: tokens per expert {load.int().tolist()}  max/mean {load.max() / load.mean():.2f}")

lora = DepthLoRA(dim=64, rank=4, n_loops=4, eps=1e-6, std=0.02)
with torch.no_grad():
    lora.up.normal_(std=0.02)  # trained adapters are non-zero; at init U_t = 0 (all loops identical)
h = torch.randn(1, 3, 64)
for t in range(6):
    print(f"loop {t}: |LoRA_t(h)| = {lora(h, t).norm():.4f}" + ("  (reuses adapter 3)" if t >= 4 else ""))
