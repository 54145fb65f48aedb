"""`OpenMythos`: embedding -> Prelude (dense blocks, once) -> Recurrent block (looped) -> Coda
(dense blocks, once) -> norm -> LM head.

    e      = Prelude(embed(ids))
    h_T    = RecurrentBlock(e, n_loops)        (see recurrence.py for the update rule)
    logits = head(norm(Coda(h_T)))
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn

from .blocks import TransformerBlock
from .cache import KVCache
from .checks import (TOKEN_ID_DTYPES, check_generation_length, check_index_range, check_int, check_seed,
                     check_token_id, check_token_ids)
from .config import MythosConfig
from .hub import CONFIG_NAME, WEIGHTS_NAME, read_config, verify_tensors, write_pretrained
from .layers import Linear, RMSNorm, rope_angles, scaled_init_std
from .moe import MoE
from .recurrence import RecurrentBlock
from .sampling import SamplingParams, sample_next


class OpenMythos(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.prelude = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.prelude_layers))
        self.recurrent = RecurrentBlock(cfg)
        self.coda = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.coda_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    # ------------------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; projections writing into the residual stream get
        init_std / sqrt(2 * effective depth), effective depth = prelude + loops + coda (loops: ``init_loops``,
        default ``max_loop_iters``)."""
        std, loops = self.cfg.init_std, self.cfg.init_loops or self.cfg.max_loop_iters
        out_std = scaled_init_std(std, self.cfg.prelude_layers + loops + self.cfg.coda_layers)
        nn.init.normal_(self.embed.weight, std=std)
        for block in [*self.prelude, self.recurrent.block, *self.coda]:
            for name, p in block.named_parameters():
                if p.dim() < 2:
                    continue
                residual_out = name.endswith(("wo.weight", "w2.weight", "ffn.w2"))
                nn.init.normal_(p, std=out_std if residual_out else std)
        if not self.cfg.tie_word_embeddings:
            nn.init.normal_(self.head.weight, std=std)

    # ------------------------------------------------------------------------------ stages
    # The forward pass as stages, so that every driver (this forward, the inference engine) runs the
    # same code: rope -> embed_prelude -> iterate x n (+ halting_prob / act_weight) -> readout -> coda_logits.
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) for integer ``positions`` of any shape S: two fp32 tensors S + (rope_dim / 2,)."""
        return rope_angles(positions, self.cfg.rope_dim, self.cfg.rope_theta)

    def embed_prelude(self, input_ids: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      cache: KVCache | None = None) -> torch.Tensor:
        """e = Prelude(embed(ids)): ids (B, T) -> (B, T, dim); run once per token."""
        x = self.embed(input_ids)
        for i, block in enumerate(self.prelude):
            x = block(x, rope, cache, ("prelude", i))
        return x

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        """h_0 of the loop for Prelude output ``e`` (..., dim): zeros, e, or noise (``cfg.state_init``)."""
        return self.recurrent.initial_state(e)

    def iterate(self, h: torch.Tensor, e: torch.Tensor, t: int | torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None,
                cache_key: tuple | None = None) -> torch.Tensor:
        """One recurrent iteration h_t -> h_{t+1} (B, T, dim) at loop index ``t``: an int, or a LongTensor (B,)
        of one index per row. Owns the index clamp (loops past max_loop_iters reuse the last LoRA adapter and
        loop embedding), the LoRA adapter and the loop embedding (recurrence.py has the update rule)."""
        return self.recurrent.iterate(h, e, t, rope, cache, cache_key)

    def halting_logit(self, h: torch.Tensor) -> torch.Tensor:
        """The ACT halting probability's logit w . h_t + b per position, fp32 (h.shape[:-1])."""
        return self.recurrent.act.halting_logit(h)

    def halting_prob(self, h: torch.Tensor) -> torch.Tensor:
        """ACT halting probability p_t = sigmoid(w . h_t + b) per position, fp32 (h.shape[:-1])."""
        return self.recurrent.act.halting_prob(h)

    def act_weight(self, p: torch.Tensor | None, cum: torch.Tensor, last: bool | torch.Tensor) -> torch.Tensor:
        """ACT weight w_t of the current loop's state given the weight ``cum`` used so far (see
        ``ACTHalting.weight``); ``last`` marks the final loop (bool, or a per-position bool tensor)."""
        return self.recurrent.act.weight(p, cum, last)

    @property
    def act_threshold(self) -> float:
        return self.recurrent.act.threshold

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        """What the loop hands to the Coda: out_norm(state), state = h_T or the ACT mixture."""
        return self.recurrent.readout(state)

    def coda_logits(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None,
                    logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """logits = head(norm(Coda(x))) for the readout ``x`` (B, T, dim): (B, T, vocab), or (B, vocab) at
        one position per row with ``logits_at`` (B,)."""
        for i, block in enumerate(self.coda):
            x = block(x, rope, cache, ("coda", i))
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at]
        return self.head(self.norm(x))

    # ------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, n_loops: int | None = None, cache: KVCache | None = None,
                *, backprop_loops: int | None = None, return_act_depth: bool = False,
                logits_at: torch.Tensor | None = None, loop_runner: Callable | None = None):
        """Logits (B, T, vocab) for token ids (B, T).

        n_loops: recurrent iterations (default ``cfg.max_loop_iters``); may exceed it (depth
        extrapolation: the loop embedding is defined for any index, LoRA reuses its last adapter).
        cache: a :class:`KVCache` to read and extend (incremental decoding).
        backprop_loops: truncated backpropagation through the last k loops only.
        return_act_depth: also return the ACT halting depth per position (B, T).
        logits_at: (B,) one position per row: logits (B, vocab) at those positions only (a prefill
        needs only each prompt's last token; the head over every position would dominate it).
        loop_runner: how a driver runs the loop, ``loop_runner(recurrent, e, rope, n_loops, cache,
        backprop_loops) -> (readout, depth)`` (training's compiled / checkpointed loop:
        ``open_mythos.training.speed.LoopRunner``); default ``self.recurrent(...)``.
        """
        n_loops = self._check_n_loops(n_loops)
        start = self._check_input(input_ids, cache, backprop_loops, logits_at)
        T = input_ids.shape[1]
        rope = self.rope(torch.arange(start, start + T, device=input_ids.device))
        e = self.embed_prelude(input_ids, rope, cache)
        if loop_runner is None:
            h, act_depth = self.recurrent(e, rope, n_loops, cache, backprop_loops)
        else:
            h, act_depth = loop_runner(self.recurrent, e, rope, n_loops, cache, backprop_loops)
        logits = self.coda_logits(h, rope, cache, logits_at)
        if cache is not None:
            cache.advance(T)
        return (logits, act_depth) if return_act_depth else logits

    def _check_n_loops(self, n_loops: int | None) -> int:
        return self.cfg.max_loop_iters if n_loops is None else check_int("n_loops", n_loops, 1)

    def _check_input(self, input_ids: torch.Tensor, cache: KVCache | None, backprop_loops: int | None,
                     logits_at: torch.Tensor | None) -> int:
        """Validate forward's arguments (ValueError naming the argument); returns the first position."""
        check_token_ids("input_ids", input_ids, self.cfg.vocab_size)
        if input_ids.device.type != self.embed.weight.device.type:
            raise ValueError(f"input_ids is on {input_ids.device}, the model on {self.embed.weight.device}")
        B, T = input_ids.shape
        if cache is not None and not all(hasattr(cache, a) for a in ("pos", "update", "loop_key", "advance")):
            raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
        start = cache.pos if cache is not None else 0
        if isinstance(cache, KVCache):  # (the engine's row cache binds its own rows and positions)
            if cache.batch_size != B:
                raise ValueError(f"cache holds batch_size={cache.batch_size} rows, input_ids has {B}")
            if start + T > cache.max_len:
                raise ValueError(f"cache overflow: the cache (max_len={cache.max_len}) holds {start} tokens, "
                                 f"no room for {T} more")
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if backprop_loops is not None:
            check_int("backprop_loops", backprop_loops, 1)
        if logits_at is not None:
            is_tensor = isinstance(logits_at, torch.Tensor)
            if not (is_tensor and logits_at.shape == (B,) and logits_at.dtype in TOKEN_ID_DTYPES):
                got = f"{logits_at.dtype} {tuple(logits_at.shape)}" if is_tensor else logits_at
                raise ValueError(f"logits_at must be an int64/int32 tensor of shape ({B},) (one position per row), "
                                 f"got {got!r}")
            check_index_range("logits_at", logits_at, T, "position")
        return start

    def parameter_counts(self) -> dict[str, int]:
        """Total and active (per token) parameter counts (works on the meta device).

        active = total - routed expert weights not selected: a token uses n_experts_per_tok of the
        n_experts routed experts. Embedding/head are counted once (tied) and included in both."""
        cfg = self.cfg
        total = sum(p.numel() for p in self.parameters())
        routed = sum(m.w1.numel() + m.w2.numel() + m.w3.numel() for m in self.moe_layers())
        inactive = routed * (cfg.n_experts - cfg.n_experts_per_tok) // cfg.n_experts
        return {"total": total, "active": total - inactive, "routed_experts": routed,
                "embedding": self.embed.weight.numel()}

    # ------------------------------------------------------------------------------ router
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_router_bias(self, rate: float | None = None) -> torch.Tensor:
        """Aux-loss-free balancing step for every MoE layer; call after each optimizer step.
        Returns the expert load (tokens per expert) measured since the last call, summed over layers."""
        rate = self.cfg.router_bias_update_rate if rate is None else rate
        loads = [m.update_router_bias(rate) for m in self.moe_layers()]
        return sum(loads) if loads else torch.zeros(0)  # no MoE layer (recurrent_ffn="dense"): no load

    # ------------------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, n_loops: int | None = None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, loop_policy: str = "per_loop") -> torch.Tensor:
        """Autoregressive sampling with a KV cache; returns prompt + new tokens (B, T + new).

        temperature=0 is greedy; top_k=0 and top_p=1 disable those filters. Rows that emit
        ``eos_token_id`` are padded with it; generation stops when every row has. ``seed`` (or an
        explicit ``generator``) makes sampling reproducible. Arguments are checked as the inference engine
        checks a ``Request`` (``checks.py``, ``SamplingParams``): the same bad value, the same ValueError.
        """
        params = SamplingParams(temperature, top_k, top_p)
        check_token_ids("input_ids", input_ids, self.cfg.vocab_size)
        check_generation_length(input_ids.shape[1], max_new_tokens, self.cfg.max_output_tokens, self.cfg.max_seq_len,
                                "max_seq_len")
        self._check_n_loops(n_loops)
        if eos_token_id is not None:
            check_token_id("eos_token_id", eos_token_id, self.cfg.vocab_size)
        if seed is not None:
            check_seed(seed)
        if generator is not None and (not isinstance(generator, torch.Generator)
                                      or generator.device.type != input_ids.device.type):
            raise ValueError(f"generator must be a torch.Generator on {input_ids.device.type}, got {generator!r}")
        B, T0 = input_ids.shape
        if generator is None and seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        cache = KVCache(B, T0 + max_new_tokens, loop_policy)
        logits = self(input_ids, n_loops, cache)[:, -1]
        tokens = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, params, generator)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            tokens.append(nxt[:, None])
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            logits = self(nxt[:, None], n_loops, cache)[:, -1]
        return torch.cat(tokens, dim=1)

    # ------------------------------------------------------------------------------ weights I/O
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` (no pickle anywhere; a digest of the tensor bytes in
        its metadata), a model card and the transformers remote-code shims (the format and its one writer:
        hub.py)."""
        write_pretrained(directory, self.cfg, self.state_dict(), self.parameter_counts())

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, verify: bool = True) -> "OpenMythos":
        """Load a ``save_pretrained`` directory. ``verify``: check the weights against the digest recorded
        at save time (files written before digests load unchecked). ValueError naming the file when
        config.json or the weights are invalid, incomplete or damaged."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found (expected a save_pretrained directory)")
        cfg = read_config(directory)
        weights = directory / WEIGHTS_NAME
        if verify:
            verify_tensors(weights)
        model = cls(cfg)
        try:
            load_model(model, str(weights), strict=True, device=str(device))
        except (SafetensorError, RuntimeError) as err:  # header damage, missing/unexpected/mis-shaped tensors
            raise ValueError(f"{weights}: {err}") from None
        model.to(device)
        if dtype is not None:
            model.to(dtype)
        return model.eval()
