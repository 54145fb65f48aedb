"""Causal self-attention: grouped-query attention (GQA) and multi-head latent attention (MLA).

Both use ``F.scaled_dot_product_attention`` (flash / cuDNN / efficient kernels on GPU, a portable
kernel on CPU) and share one masking rule, written once in :func:`attend`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import MythosConfig
from .layers import Linear, RMSNorm, apply_rope


def attention_backends():
    """SDPA backend priority for CUDA: cuDNN, then flash, then mem-efficient, then math.

    cuDNN handles MLA's unequal q/k (192) and v (128) head dims, which flash refuses; measured on an
    H100 it is also the fastest for equal dims. A no-op on CPU. Must wrap tracing under torch.compile.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: allow all, default order
        return sdpa_kernel(order)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
           scale: float | None = None, dropout_p: float = 0.0, mask: torch.Tensor | None = None,
           window: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v, for queries at positions start..start+T-1.

    q: (B, T, H, d), k: (B, S, Hk, d), v: (B, S, Hk, dv) with S = start + T and H % Hk == 0.
    ``mask`` (B, 1, T, S) bool, True = may attend, replaces the causal rule: the inference
    engine's rows sit at different positions of a static cache; a query's position is then the
    last key it may see. ``window`` (``cfg.attn_window``): a query at position i sees only keys
    i - window < j <= i (sliding-window attention: a fixed receptive field per layer, like a
    causal convolution's kernel). Returns (B, T, H, dv).
    """
    T, S = q.shape[1], k.shape[1]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    causal = False
    if window is not None and window >= start + T and mask is None:
        window = None  # the window covers every key: the plain causal rule (and SDPA's fused causal kernels)
    if window is not None:
        keys = torch.arange(S, device=q.device)
        if mask is None:  # queries at start .. start + T - 1
            query_pos = torch.arange(start, start + T, device=q.device)[:, None]
            mask = (keys <= query_pos) & (keys > query_pos - window)
        else:             # each query's position: the last key the given mask lets it see
            query_pos = torch.where(mask, keys, -1).amax(-1, keepdim=True)
            mask = mask & (keys > query_pos - window)
    elif mask is None and start == 0:
        causal = T > 1
    elif mask is None and T > 1:  # a chunk after cached tokens: query i sees keys j <= start + i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                         dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


class GQAttention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads; RoPE on q, k."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout, self.window = cfg.dropout, cfg.attn_window
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None = None, cache_key: tuple | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), *rope)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), *rope)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        start, mask = 0, None
        if cache is not None:
            start, mask = cache.pos, cache.mask
            kv = cache.update(cache_key, k=k, v=v)
            k, v = kv["k"], kv["v"]
        out = attend(q, k, v, start, dropout_p=self.dropout if self.training else 0.0, mask=mask,
                     window=self.window)
        return self.wo(out.reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2).

    q = W_qb norm(W_qa x)                       (low-rank query; plain W_q if q_lora_rank = 0)
    [c_kv, k_pe] = W_kva x;  c_kv <- norm(c_kv)  (compressed latent, one shared rotary key)
    [k_nope, v] = W_kvb c_kv                     (per-head keys/values expanded from the latent)
    score = (q_nope . k_nope + q_pe . k_pe) / sqrt(d_nope + d_rope)

    The cache holds only ``c_kv`` (kv_lora_rank) and ``k_pe`` (qk_rope_head_dim) per token.
    Decoding from the cache uses *absorbed* projections: W_uk (the key half of W_kvb) is folded
    into the query and W_uv (the value half) applied after attention, so attention runs directly
    over the latent as multi-query attention and the per-head keys are never materialised.
    """

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.dropout, self.window = cfg.dropout, cfg.attn_window
        self.scale = 1.0 / math.sqrt(cfg.qk_head_dim)
        q_out = cfg.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank > 0:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.wq = Linear(cfg.dim, q_out, bias=False)
        self.wkv_a = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        self.absorb_decode = True  # False: expand the latent to per-head k/v also when decoding

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wq"):
            return self.wq(x)
        return self.wq_b(self.q_norm(self.wq_a(x)))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None = None, cache_key: tuple | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self._query(x).view(B, T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, *rope)
        c_kv, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_norm(c_kv)
        k_pe = apply_rope(k_pe.unsqueeze(2), *rope).squeeze(2)
        start, mask = 0, None
        if cache is not None:
            start, mask = cache.pos, cache.mask
            latent = cache.update(cache_key, c_kv=c_kv, k_pe=k_pe)
            c_kv, k_pe = latent["c_kv"], latent["k_pe"]
            if self.absorb_decode:
                return self._absorbed(q_nope, q_pe, c_kv, k_pe, start, mask)
        S = c_kv.shape[1]
        k_nope, v = self.wkv_b(c_kv).view(B, S, self.n_heads, self.nope_dim + self.v_dim).split(
            [self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, S, self.n_heads, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        out = attend(q, k, v, start, scale=self.scale, dropout_p=self.dropout if self.training else 0.0,
                     mask=mask, window=self.window)
        return self.wo(out.reshape(B, T, -1))

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                  k_pe: torch.Tensor, start: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the latent: q_lat = q_nope W_uk; out = softmax(...) c_kv W_uv."""
        B, T = q_nope.shape[:2]
        w = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
        q = torch.cat((q_lat, q_pe), dim=-1)                       # (B, T, H, r + rope)
        k = torch.cat((c_kv, k_pe), dim=-1).unsqueeze(2)           # (B, S, 1, r + rope)
        o_lat = attend(q, k, c_kv.unsqueeze(2), start, scale=self.scale, mask=mask,
                       window=self.window)  # (B, T, H, r)
        out = torch.einsum("bthr,hvr->bthv", o_lat, w_uv)
        return self.wo(out.reshape(B, T, -1))


def build_attention(cfg: MythosConfig) -> nn.Module:
    return MLAttention(cfg) if cfg.attn_type == "mla" else GQAttention(cfg)
