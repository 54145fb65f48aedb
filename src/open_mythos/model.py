"""`OpenMythos`: embedding -> Prelude (dense blocks, once) -> Recurrent block (looped) -> Coda
(dense blocks, once) -> norm -> LM head.

    e      = Prelude(embed(ids))
    h_T    = RecurrentBlock(e, n_loops)        (see recurrence.py for the update rule)
    logits = head(norm(Coda(h_T)))
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn

from .blocks import TransformerBlock
from .cache import KVCache
from .checks import TOKEN_ID_DTYPES, check_index_range, check_int, check_token_ids
from .config import MythosConfig
from .hub import CONFIG_NAME, WEIGHTS_NAME, read_config, save_weights, verify_tensors, write_config
from .layers import Linear, RMSNorm, compute_dtype, rope_angles, scaled_init_std
from .moe import MoE
from .recurrence import RecurrentBlock
from .sampling import SamplingParams, sample_next

CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that add cudagraph trees


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

    # ------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, n_loops: int | None = None, cache: KVCache | None = None,
                *, backprop_loops: int | None = None, return_act_depth: bool = False,
                logits_at: torch.Tensor | None = None):
        """Logits (B, T, vocab) for token ids (B, T).

        n_loops: recurrent iterations (default ``cfg.max_loop_iters``); may exceed it (depth
        extrapolation: the loop embedding is defined for any index, LoRA reuses its last adapter).
        cache: a :class:`KVCache` to read and extend (incremental decoding).
        backprop_loops: truncated backpropagation through the last k loops only.
        return_act_depth: also return the ACT halting depth per position (B, T).
        logits_at: (B,) one position per row: logits (B, vocab) at those positions only (a prefill
        needs only each prompt's last token; the head over every position would dominate it).
        """
        n_loops = self._check_n_loops(n_loops)
        start = self._check_input(input_ids, cache, backprop_loops, logits_at)
        T = input_ids.shape[1]
        positions = torch.arange(start, start + T, device=input_ids.device)
        rope = rope_angles(positions, self.cfg.rope_dim, self.cfg.rope_theta)

        x = self.embed(input_ids)
        for i, block in enumerate(self.prelude):
            x = block(x, rope, cache, ("prelude", i))
        h, act_depth = self.run_loop(x, rope, n_loops, cache, backprop_loops)
        for i, block in enumerate(self.coda):
            h = block(h, rope, cache, ("coda", i))
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]
        logits = self.head(self.norm(h))
        if cache is not None:
            cache.advance(T)
        return (logits, act_depth) if return_act_depth else logits

    def run_loop(self, e: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], n_loops: int,
                 cache: KVCache | None, backprop_loops: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrent block. Training under autocast, its shared matrices are cast to the autocast dtype
        once for all n_loops iterations, not once per iteration inside each compiled one (eager autocast's
        weight cache does the same for F.linear); their gradient is then summed over the loops in that
        dtype (as FSDP2's mixed precision does) and cast back to fp32 once. Not with activation
        checkpointing: its recomputation runs after this call, on the fp32 parameters."""
        rec = self.recurrent
        dtype = compute_dtype(e)
        if rec.cast_matrices_once and not rec.checkpoint_loops and torch.is_grad_enabled() and dtype != e.dtype:
            return torch.func.functional_call(rec, rec.matrices_in(dtype), (e, rope, n_loops, cache, backprop_loops))
        return rec(e, rope, n_loops, cache, backprop_loops)

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
        if isinstance(cache, KVCache):  # (the engine's slot cache binds its own rows and positions)
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
            if not (isinstance(logits_at, torch.Tensor) and logits_at.shape == (B,)
                    and logits_at.dtype in TOKEN_ID_DTYPES):
                got = f"{logits_at.dtype} {tuple(logits_at.shape)}" if isinstance(logits_at, torch.Tensor) else logits_at
                raise ValueError(f"logits_at must be an int64/int32 tensor of shape ({B},) (one position per row), "
                                 f"got {got!r}")
            check_index_range("logits_at", logits_at, T, "position")
        return start

    def compile_blocks(self, **compile_kwargs) -> "OpenMythos":
        """torch.compile every Prelude/Coda block, one recurrent iteration (injection + LoRA + transformer
        body) and the ACT bookkeeping after it, used for every loop without a cache. The loop itself stays
        in Python, so any n_loops runs without recompiling; decoding with a cache runs the eager iteration."""
        for block in [*self.prelude, *self.coda]:
            block.compile(**compile_kwargs)
        self.recurrent.compiled_step = torch.compile(self.recurrent.step, **compile_kwargs)
        self.recurrent.compiled_halt = torch.compile(self.recurrent.halt, **compile_kwargs)
        # CUDA-graph trees (these modes) treat parameters as static inputs: matrices cast once per forward would
        # be new tensors at every call, so the trees would re-record their graphs: there, cast inside each iteration
        self.recurrent.cast_matrices_once = compile_kwargs.get("mode") not in CUDAGRAPH_COMPILE_MODES
        return self

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
        explicit ``generator``) makes sampling reproducible.
        """
        params = SamplingParams(temperature, top_k, top_p)
        check_token_ids("input_ids", input_ids, self.cfg.vocab_size)
        check_int("max_new_tokens", max_new_tokens, 1)
        if max_new_tokens > self.cfg.max_output_tokens:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds max_output_tokens={self.cfg.max_output_tokens}")
        self._check_n_loops(n_loops)
        if eos_token_id is not None:
            check_int("eos_token_id", eos_token_id, 0, self.cfg.vocab_size - 1)
        if seed is not None:
            check_int("seed", seed, 0, 2 ** 64 - 1)  # torch.Generator.manual_seed's range
        if generator is not None and (not isinstance(generator, torch.Generator)
                                      or generator.device.type != input_ids.device.type):
            raise ValueError(f"generator must be a torch.Generator on {input_ids.device.type}, got {generator!r}")
        B, T0 = input_ids.shape
        if T0 + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.cfg.max_seq_len}")
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
        its metadata), a model card and the transformers remote-code shims (see hub.py)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_config(directory, self.cfg)
        save_weights(self.state_dict(), directory / WEIGHTS_NAME, self.cfg)

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
