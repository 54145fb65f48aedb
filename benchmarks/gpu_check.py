"""Correctness of the GPU paths against references, on the device (prints JSON, exits 1 on failure).

    python benchmarks/gpu_check.py [--out DIR]

1. grouped-GEMM MoE in bf16 vs the naive per-expert loop on the same weights upcast to fp32 (values, grads)
2. compiled model vs eager model under bf16 autocast (logits, grads)
3. cached token-by-token decode vs full forward, fp32, GQA and MLA, more loops than trained
4. pure-bf16 model vs fp32 model (next-token distributions)
5. inference engine, fp32: CUDA-graph stages vs eager stages (mixed exit rules, both schedules), and
   the engine at fixed depth vs OpenMythos.generate (fraction of differing tokens; limit 0)
6. training with step_graph=true (the step as CUDA graphs) vs the uncaptured compiled trainer: losses over
   sampled loop counts and two micro-batches, bf16 (``--only step_graph`` runs this alone)
Error = ||out - ref|| / ||ref||; thresholds follow the bf16 / fp32 expectations.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys

import torch

from common import env_info, write_report
from moe import naive_moe

from open_mythos import KVCache, MythosConfig, OpenMythos
from open_mythos.attention import attention_backends
from open_mythos.inference import Engine, ExitRule, Request
from open_mythos.sampling import SamplingParams
from open_mythos.moe import MoE
from open_mythos.training.config import load_config
from open_mythos.training.loop import Trainer
from open_mythos.training.speed import LoopRunner, compile_blocks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def small(attn: str) -> MythosConfig:
    return MythosConfig(vocab_size=512, dim=256, n_heads=4, n_kv_heads=2, max_seq_len=256, max_loop_iters=4,
                        prelude_layers=1, coda_layers=1, attn_type=attn, kv_lora_rank=64, q_lora_rank=96,
                        qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_experts=16, n_shared_experts=1,
                        n_experts_per_tok=4, expert_dim=128, lora_rank=8)


def step_graph_checks(checks: dict) -> None:
    runs = {}
    for graph in (False, True):
        cfg = load_config("shakespeare-tiny", overrides=[
            f"step_graph={str(graph).lower()}", "optim.muon_impl='batched'", "compile=true", "grad_accum=2",
            "precision='bf16'", "loops.schedule='uniform'", "loops.mean=2", "loops.max_sampled=3", "loops.backprop=0",
            "sample_tokens=0", f"out_dir='/tmp/gpu_check_step_graph_{graph}'"])
        trainer = Trainer(cfg, progress=False)
        recs = []
        for _ in range(10):
            recs.append(trainer.train_step())
            trainer.step += 1
        runs[graph] = recs
    losses = [torch.tensor([r["loss"] for r in runs[g]]) for g in (False, True)]
    checks["step_graph_vs_uncaptured_bf16"] = {
        "loss": rel(losses[1], losses[0]), "limit": 2e-2,
        "graphed_steps": sum(r["graphed"] for r in runs[True]), "loops": [r["n_loops"] for r in runs[True]]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--only", choices=["step_graph"], default=None, help="run one group of checks")
    args = p.parse_args()
    dev = "cuda"
    checks = {}
    torch.manual_seed(0)
    step_graph_checks(checks)
    if args.only == "step_graph":
        return report(checks, args.out)

    # 1. MoE
    cfg = MythosConfig(dim=1024, n_experts=64, n_experts_per_tok=4, expert_dim=256, n_shared_experts=2)
    ref = MoE(cfg).to(dev).train()
    for prm in ref.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    fast = copy.deepcopy(ref).to(torch.bfloat16)
    for name, tokens in (("moe_bf16_vs_naive_fp32", 4096), ("moe_gathered_bf16_vs_naive_fp32", 3)):
        ref.zero_grad()
        fast.zero_grad()
        x = torch.randn(tokens, 1024, device=dev)  # 4096 tokens: sorted + grouped_mm; 3: gathered weights
        g = torch.randn_like(x)
        xr, xf = x.clone().requires_grad_(), x.bfloat16().requires_grad_()
        ids, _ = fast.route(xf.detach())  # same experts on both sides: bf16 and fp32 scores can differ on ties
        yr = naive_moe(ref, xr, ids)
        yr.backward(g)
        yf = fast(xf)
        yf.backward(g.bfloat16())
        checks[name] = {"out": rel(yf, yr), "grad_x": rel(xf.grad, xr.grad),
                        "grad_w1": rel(fast.w1.grad, ref.w1.grad), "limit": 2e-2}

    for attn in ("gqa", "mla"):
        # 2. compiled vs eager, bf16 autocast
        model = OpenMythos(small(attn)).to(dev).train()
        comp = copy.deepcopy(model)
        runners = (LoopRunner(), compile_blocks(comp))
        ids = torch.randint(0, 512, (4, 128), device=dev)
        outs, grads = [], []
        for m, runner in zip((model, comp), runners):
            with attention_backends(), torch.autocast("cuda", torch.bfloat16):
                out = m(ids, 4, loop_runner=runner)
            out.float().square().mean().backward()
            outs.append(out)
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        checks[f"{attn}_compiled_vs_eager_bf16"] = {"out": rel(outs[1], outs[0]), "grads": rel(grads[1], grads[0]),
                                                   "limit": 2e-2}
        # 3. decode vs full forward, fp32
        model.eval()
        ids = torch.randint(0, 512, (2, 40), device=dev)
        with torch.no_grad():
            full = model(ids, 6)
            cache = KVCache(2, 40)
            steps = [model(ids[:, :8], 6, cache)] + [model(ids[:, t:t + 1], 6, cache) for t in range(8, 40)]
        checks[f"{attn}_decode_vs_full_fp32"] = {"out": rel(torch.cat(steps, 1), full), "limit": 1e-3}
        # 4. pure bf16
        bf = copy.deepcopy(model).to(torch.bfloat16)
        with torch.no_grad():
            p32, p16 = full.softmax(-1), bf(ids, 6).float().softmax(-1)
        checks[f"{attn}_pure_bf16_vs_fp32_probs"] = {"out": rel(p16, p32), "limit": 3e-2}

        # 5. engine
        torch.nn.init.normal_(model.recurrent.act.proj.weight, std=0.05)
        gen = torch.Generator().manual_seed(0)
        rules = [ExitRule("act"), ExitRule("rel_change", 0.05), ExitRule("kl", 1e-4), ExitRule("none")]
        reqs = [Request(torch.randint(0, 512, (int(torch.randint(1, 60, (1,), generator=gen)),),
                                      generator=gen).tolist(),
                        24, 4, SamplingParams(temperature=0.7 * (i % 2)), rules[i % 4], seed=i) for i in range(12)]
        eager = Engine(model, max_batch=4, cuda_graphs=False).run(reqs)
        wrong = 0
        for schedule in ("depth", "static"):
            engine = Engine(model, max_batch=4, schedule=schedule, cuda_graphs=True)
            for _ in range(2):
                out = engine.run(reqs)
                wrong += sum((a.tokens, a.depths) != (b.tokens, b.depths) for a, b in zip(eager, out))
        # greedy only: pipelined depth ticks (the device starts each token), standby rows, 2 loops per tick
        greedy = [dataclasses.replace(r, sampling=SamplingParams(temperature=0)) for r in reqs]
        eager = Engine(model, max_batch=4, cuda_graphs=False).run(greedy)
        engine = Engine(model, max_batch=4, cuda_graphs=True, sync_every=2, prefill_batch=3)
        for _ in range(2):
            out = engine.run(greedy)
            wrong += sum((a.tokens, a.depths) != (b.tokens, b.depths) for a, b in zip(eager, out))
        fixed = [Request(r.prompt, 16, 4, SamplingParams(temperature=0)) for r in reqs[:4]]
        ref = [model.generate(torch.tensor([r.prompt], device=dev), 16, 4, temperature=0)[0, len(r.prompt):].tolist()
               for r in fixed]
        got = [c.tokens for c in Engine(model, max_batch=4).run(fixed)]
        checks[f"{attn}_engine_graphs_vs_eager_fp32"] = {"requests_differing": wrong, "limit": 0,
                                                        "depth_histogram": sorted({d for c in eager for d in c.depths})}
        checks[f"{attn}_engine_vs_generate_fp32"] = {"requests_differing": sum(a != b for a, b in zip(ref, got)),
                                                    "limit": 0}

    return report(checks, args.out)


def report(checks: dict, out: str | None) -> int:
    ok = all(all(v <= c["limit"] for k, v in c.items()
                 if isinstance(v, (int, float)) and k not in ("limit", "graphed_steps")) for c in checks.values())
    write_report("gpu_check", {"benchmark": "gpu_check", "env": env_info(), "checks": checks, "passed": ok}, out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
