"""`MythosConfig`: every hyper-parameter of the Recurrent-Depth Transformer, validated.

The field names and defaults follow the OpenMythos documents; the few extra fields (marked
"open-mythos" below) make behaviour that the documents leave implicit explicit and switchable.
Every impossible value raises ``ValueError`` naming the field, so a typo never turns into a
shape error deep inside the model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .checks import check_finite

ATTN_TYPES = ("mla", "gqa")
LOOP_OUTPUTS = ("final", "act")
INJECTIONS = ("lti", "residual", "parcae")
LOOP_EMBEDS = ("sinusoid", "learned")
STATE_INITS = ("zeros", "embed", "random")
RECURRENT_FFNS = ("moe", "dense")
_FIELD_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool,
                "list[int]": list, "tuple[float, float]": (list, tuple)}


def check_field_types(obj: Any, section: str = "") -> None:
    """Raise ValueError naming the field when a dataclass field has the wrong type (bool is not int) or a
    float field is not finite."""
    for f in dataclasses.fields(obj):
        value, type_name = getattr(obj, f.name), str(f.type)
        if type_name.endswith(" | None"):
            if value is None:
                continue
            type_name = type_name.removesuffix(" | None")
        expected = _FIELD_TYPES.get(type_name)
        if expected is None:  # nested dataclass sections validate themselves
            continue
        if not isinstance(value, expected) or (isinstance(value, bool) and type_name != "bool"):
            raise ValueError(f"{section}{f.name} must be of type {type_name}, got {value!r}")
        if type_name == "float":  # inf/nan pass every range check written as a comparison
            check_finite(f"{section}{f.name}", value)
        elif type_name == "tuple[float, float]":
            if len(value) != 2:
                raise ValueError(f"{section}{f.name} must be a pair of numbers, got {value!r}")
            for i, v in enumerate(value):
                check_finite(f"{section}{f.name}[{i}]", v)


# keys of a config.json that describe the file, not the model (written by us or by transformers)
HUB_METADATA = {"format_version", "model_type", "open_mythos_version", "architectures", "auto_map",
                "transformers_version", "dtype",
                "torch_dtype", "use_cache", "num_hidden_layers"}


@dataclass
class MythosConfig:
    # vocabulary and width
    vocab_size: int = 32000
    dim: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 4
    max_seq_len: int = 4096
    # recurrent depth: Prelude (run once) -> Recurrent block (looped) -> Coda (run once)
    max_loop_iters: int = 16
    prelude_layers: int = 2
    coda_layers: int = 2
    # attention: "mla" (DeepSeek-V2 multi-head latent attention) or "gqa" (grouped-query)
    attn_type: str = "mla"
    kv_lora_rank: int = 512
    q_lora_rank: int = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    # fine-grained mixture of experts in the recurrent block
    n_experts: int = 64
    n_shared_experts: int = 2
    n_experts_per_tok: int = 4
    expert_dim: int = 512
    # ACT halting, RoPE, depth-wise LoRA, generation limit, regularisation
    act_threshold: float = 0.99
    rope_theta: float = 500000.0
    lora_rank: int = 16
    max_output_tokens: int = 4096
    dropout: float = 0.0
    # open-mythos: what the recurrent block hands to the Coda. "final" = the last loop state h_T
    # (default: extrapolates to more loops), "act" = the ACT-weighted mixture sum_t w_t h_t.
    loop_output: str = "final"
    # open-mythos: aux-loss-free balancing step size for the router bias (DeepSeek-V3 "gamma").
    router_bias_update_rate: float = 1e-3
    # open-mythos: misc.
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # open-mythos: amplitude of the sinusoidal loop-index embedding added to each loop's input. The
    # token signal starts at ~init_std per channel, so at amplitude 1 the loop index dominates the
    # block's normalised input. Default 0 (no loop embedding, as Huginn, Parcae, Saunshi et al. and Ouro):
    # amplitude 1 cost 0.013 held-out nats on Shakespeare at equal tokens (docs/architecture.md,
    # "Recurrence recipe"); the k-hop task learns no lookup at 0.02 (docs/experiments.md).
    loop_embed_scale: float = 0.0
    # open-mythos: the recurrent update (recurrence.py; evidence in docs/architecture.md, "Recurrence recipe").
    # "lti": h' = A h + B e + T(h + e) with every A_ii in [0, 1): what a loop writes decays at the next.
    # "residual": h' = h + T(h + e): the state is a residual stream, as in a deep transformer (A = I, B = 0).
    # "parcae": h' = A h + Δ ⊙ (B e) + T(h + e), Parcae's constrained form: a step Δ = softplus(.) per channel and a
    # full B started at the identity (recurrence.ParcaeInjection).
    injection: str = "lti"
    # open-mythos: the loop-index embedding, "sinusoid" (fixed) or "learned" (a trained table of max_loop_iters rows,
    # started as the sinusoid at loop_embed_scale; loops beyond use the last row).
    loop_embed: str = "sinusoid"
    # open-mythos: RMSNorm on the recurrent block's attention and FFN outputs before they join the state (Huginn's
    # "sandwich" block), on top of the pre-norms.
    sandwich_norm: bool = False
    # open-mythos: the state before the first loop, h_0: "zeros", "embed" (h_0 = e, the Prelude output)
    # or "random" (h_0 ~ N(0, init_std^2) per entry, Huginn).
    state_init: str = "zeros"
    # open-mythos: RMSNorm on the state the recurrent block hands to the Coda.
    loop_out_norm: bool = True
    # open-mythos: RMSNorm on the state after every loop, h_{t+1} = RMSNorm(h' of the injection): its scale cannot
    # grow with the loops (under "residual" it otherwise grows, the injected e's share of x_t = h_t + e shrinks and
    # each loop's update moves the state's direction less), so loop t cannot tell t from the scale. Off by default:
    # k-hop needs it (H200 run 11, docs/experiments.md); on text a CPU probe found a small cost (docs/architecture.md).
    state_norm: bool = False
    # open-mythos: FFN of the recurrent block, "moe" (the documents' fine-grained MoE) or "dense" (SwiGLU).
    recurrent_ffn: str = "moe"
    # open-mythos: loop count in the effective depth prelude + loops + coda that scales the init of
    # projections writing into the residual stream (init_std / sqrt(2 depth)); None: max_loop_iters.
    init_loops: int | None = None
    # open-mythos: sliding-window attention in every layer: a position sees itself and the window - 1 before it
    # (None: the whole prefix). A fixed receptive field per layer, like the conv nets of the easy-to-hard
    # results (Bansal et al. 2022): information then travels at most window - 1 positions per loop.
    attn_window: int | None = None
    tie_word_embeddings: bool = True
    dense_ffn_dim: int | None = field(default=None)  # None: SwiGLU width 8/3*dim rounded to 64

    def __post_init__(self) -> None:
        check_field_types(self)
        _positive(self, "vocab_size", "dim", "n_heads", "max_seq_len", "max_loop_iters",
                  "n_experts", "n_experts_per_tok", "expert_dim", "max_output_tokens")
        _non_negative(self, "prelude_layers", "coda_layers", "n_shared_experts", "lora_rank")
        if self.attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {self.attn_type!r}")
        if self.loop_output not in LOOP_OUTPUTS:
            raise ValueError(f"loop_output must be one of {LOOP_OUTPUTS}, got {self.loop_output!r}")
        for name, allowed in (("injection", INJECTIONS), ("state_init", STATE_INITS),
                              ("recurrent_ffn", RECURRENT_FFNS), ("loop_embed", LOOP_EMBEDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.init_loops is not None:
            _positive(self, "init_loops")
        if self.attn_type == "gqa":
            _positive(self, "n_kv_heads")
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
            if (self.dim // self.n_heads) % 2:
                raise ValueError(f"head dim dim/n_heads = {self.dim // self.n_heads} must be even "
                                 "for RoPE (check dim and n_heads)")
        else:
            _positive(self, "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
            _non_negative(self, "q_lora_rank", "qk_nope_head_dim")
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.n_experts_per_tok > self.n_experts:
            raise ValueError(f"n_experts_per_tok ({self.n_experts_per_tok}) must be <= "
                             f"n_experts ({self.n_experts})")
        if not 0.0 < self.act_threshold <= 1.0:
            raise ValueError(f"act_threshold must be in (0, 1], got {self.act_threshold}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.router_bias_update_rate >= 0:
            raise ValueError(f"router_bias_update_rate must be >= 0, got {self.router_bias_update_rate}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.loop_embed_scale >= 0:
            raise ValueError(f"loop_embed_scale must be >= 0, got {self.loop_embed_scale}")
        if not 0 < self.init_std <= 1:  # N(0, init_std^2) weights; far above 1 the first forward overflows fp32
            raise ValueError(f"init_std must be in (0, 1] (the initial weights' std), got {self.init_std}")
        if self.dense_ffn_dim is not None:
            _positive(self, "dense_ffn_dim")
        if self.attn_window is not None:
            _positive(self, "attn_window")

    # derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """GQA per-head width."""
        return self.dim // self.n_heads

    @property
    def qk_head_dim(self) -> int:
        """MLA query/key per-head width: non-rotary part + decoupled rotary part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        """Width that RoPE rotates: the whole GQA head, or MLA's decoupled rotary part."""
        return self.head_dim if self.attn_type == "gqa" else self.qk_rope_head_dim

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the dense SwiGLU FFN in Prelude and Coda blocks."""
        if self.dense_ffn_dim is not None:
            return self.dense_ffn_dim
        return 64 * -(-int(8 * self.dim / 3) // 64)

    # serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MythosConfig":
        """From a config.json; the hub metadata keys (HUB_METADATA) that transformers adds are skipped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - HUB_METADATA)
        if unknown:
            raise ValueError(f"unknown MythosConfig field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _positive(cfg: MythosConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def _non_negative(cfg: MythosConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
