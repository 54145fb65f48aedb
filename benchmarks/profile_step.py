"""Profile one compiled SPEC training step: top CUDA kernels, and SDPA backends at the SPEC shape.

    python benchmarks/profile_step.py --attn gqa
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import time_fn
from train_step import SPEC

from open_mythos.training.config import load_config
from open_mythos.training.loop import Trainer


def sdpa_table() -> None:
    B, H, T = 8, 16, 1024
    for name, (dqk, dv, hk) in {"gqa_h128_kv4": (64, 64, 4), "mha_h64": (64, 64, 16), "mla_192_128": (192, 128, 16)}.items():
        q = torch.randn(B, H, T, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, hk, T, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, hk, T, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            def run():
                with sdpa_kernel([be]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hk != H).sum().backward()
            try:
                print(f"sdpa {name:14s} {be.name:20s} {time_fn(run, 2, 5) * 1e3:8.2f} ms fwd+bwd")
            except RuntimeError as err:
                print(f"sdpa {name:14s} {be.name:20s} unsupported ({str(err).splitlines()[0][:80]})")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attn", default="gqa")
    args = p.parse_args()
    sdpa_table()
    cfg = load_config("shakespeare-tiny", overrides=[*SPEC, f"model.attn_type='{args.attn}'", "compile=true",
                                                      "out_dir='/tmp/prof'"])
    trainer = Trainer(cfg, progress=False)
    for _ in range(3):
        trainer.train_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        rec = trainer.train_step()
    print("step tokens/s", rec["tokens_per_s"])
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
