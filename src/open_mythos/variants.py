"""Pre-configured model scales (the OpenMythos table) and honest parameter counts.

    | variant     | dim   | experts | expert dim | loops | context | max output |
    |-------------|-------|---------|------------|-------|---------|------------|
    | mythos_1b   | 2048  | 64      | 2048       | 16    | 4096    | 4096       |
    | mythos_3b   | 3072  | 64      | 4096       | 16    | 4096    | 4096       |
    | mythos_10b  | 4096  | 128     | 5632       | 24    | 8192    | 4096       |
    | mythos_50b  | 6144  | 256     | 9728       | 32    | 8192    | 4096       |
    | mythos_100b | 8192  | 256     | 13568      | 32    | 1M      | 131072     |
    | mythos_500b | 12288 | 512     | 23040      | 48    | 1M      | 131072     |
    | mythos_1t   | 16384 | 512     | 34560      | 64    | 1M      | 131072     |

(loops = max_loop_iters, context = max_seq_len, max output = max_output_tokens; every variant: MLA
attention, o200k_harmony vocabulary.) Counts are computed on the meta device: no weight is allocated, so even
``mythos_1t`` is instant.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import MythosConfig
from .model import OpenMythos

O200K_HARMONY_VOCAB = 201088  # MythosTokenizer (gpt-oss-20b's o200k_harmony)


def _variant(dim: int, n_experts: int, expert_dim: int, loops: int, context: int, max_output: int,
             n_heads: int, top_k: int, stage_layers: int, q_lora_rank: int) -> MythosConfig:
    return MythosConfig(
        vocab_size=O200K_HARMONY_VOCAB, dim=dim, n_heads=n_heads, n_kv_heads=max(1, n_heads // 4),
        max_seq_len=context, max_loop_iters=loops, prelude_layers=stage_layers, coda_layers=stage_layers,
        attn_type="mla", kv_lora_rank=512, q_lora_rank=q_lora_rank, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, n_experts=n_experts, n_shared_experts=2,
        n_experts_per_tok=top_k, expert_dim=expert_dim, max_output_tokens=max_output)


def mythos_1b() -> MythosConfig:
    return _variant(2048, 64, 2048, 16, 4096, 4096, n_heads=16, top_k=4, stage_layers=2, q_lora_rank=1536)


def mythos_3b() -> MythosConfig:
    return _variant(3072, 64, 4096, 16, 4096, 4096, n_heads=24, top_k=4, stage_layers=2, q_lora_rank=1536)


def mythos_10b() -> MythosConfig:
    return _variant(4096, 128, 5632, 24, 8192, 4096, n_heads=32, top_k=6, stage_layers=3, q_lora_rank=1536)


def mythos_50b() -> MythosConfig:
    return _variant(6144, 256, 9728, 32, 8192, 4096, n_heads=48, top_k=8, stage_layers=4, q_lora_rank=3072)


def mythos_100b() -> MythosConfig:
    return _variant(8192, 256, 13568, 32, 1 << 20, 131072, n_heads=64, top_k=8, stage_layers=4,
                    q_lora_rank=3072)


def mythos_500b() -> MythosConfig:
    return _variant(12288, 512, 23040, 48, 1 << 20, 131072, n_heads=96, top_k=8, stage_layers=6,
                    q_lora_rank=3072)


def mythos_1t() -> MythosConfig:
    return _variant(16384, 512, 34560, 64, 1 << 20, 131072, n_heads=128, top_k=8, stage_layers=6,
                    q_lora_rank=3072)


VARIANTS: dict[str, Callable[[], MythosConfig]] = {
    "mythos_1b": mythos_1b, "mythos_3b": mythos_3b, "mythos_10b": mythos_10b, "mythos_50b": mythos_50b,
    "mythos_100b": mythos_100b, "mythos_500b": mythos_500b, "mythos_1t": mythos_1t,
}


def count_parameters(cfg: MythosConfig) -> dict[str, int]:
    """``OpenMythos.parameter_counts`` of the model ``cfg`` describes, without allocating weights."""
    with torch.device("meta"):
        return OpenMythos(cfg).parameter_counts()
