"""One decode step's write into the engine's recurrent KV cache, compiled, per formulation.

    python benchmarks/cache_write.py [--slots 64] [--loops 32] [--max-len 256]

The recurrent block's per-loop cache of the SPEC config (4 kv heads x 64, bf16) for ``--slots`` rows
(+ the scratch slot), ``--loops`` loop slots and ``--max-len`` positions: one write of k and v per
row at its position and loop slot (filled forward), then the read of each row's keys, as attention
does. Candidates: the library's write (``index_put_`` on the 5-D buffer) and the earlier one
(``index_copy_`` into a flattened view), compiled and kept out of the compiled graph. Each is
replayed from a CUDA graph; the report gives microseconds per call and the buffer size (a
formulation that copies the whole buffer costs ~2 x its bytes / HBM bandwidth).
"""

from __future__ import annotations

import argparse

import torch

from common import GRAPH_REPEATS, env_info, graph_time, write_report

from open_mythos.inference.rows import RowKVCache


def flat_index_copy(cache: RowKVCache, eager: bool):
    """The engine's earlier write: index_copy_ into a flattened view of the buffer (same result as
    RowKVCache.update). Compiled, inductor copied the whole buffer; ``eager`` keeps it out of the
    compiled graph (a plain scatter kernel)."""
    def scatter(flat, index, src):
        flat.index_copy_(0, index, src)

    scatter = torch.compiler.disable(scatter) if eager else scatter

    def update(key, **new):
        out = {}
        for name, value in new.items():
            buf = cache._buffers[key[0]][name]
            rows, pos, ls, depth = cache._rows, cache._positions, cache._loop_slot, buf.shape[1]
            loop_slots = torch.arange(depth, device=rows.device)
            fill = (loop_slots >= ls[:, None]) & cache._write[:, None]
            index = torch.where(fill, (rows[:, None] * depth + loop_slots) * cache.max_len + pos[:, None],
                                (cache.n_rows - 1) * depth * cache.max_len)
            scatter(buf.view(-1, *buf.shape[3:]), index.flatten(),
                    value.expand(-1, depth, *value.shape[2:]).flatten(0, 1).to(buf.dtype))
            out[name] = buf[rows, ls]
        return out
    return update


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--loops", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, B = "cuda", args.slots
    cache = RowKVCache(B + 1, args.max_len, "per_loop", args.loops)
    g = torch.Generator(device=dev).manual_seed(0)
    rows = torch.randperm(B, device=dev, generator=g)
    pos = torch.randint(0, args.max_len, (B,), device=dev, generator=g)
    ls = torch.randint(0, args.loops, (B,), device=dev, generator=g)
    write = torch.rand(B, device=dev, generator=g) < 0.8
    k, v = (torch.randn(B, 1, 4, 64, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    cache.bind(rows, pos, ls, write)
    cache.update(("recurrent", 0), k=k, v=v)  # allocates the buffers
    buffer_mb = 2 * cache._buffers["recurrent"]["k"].nbytes / 2**20
    results, reference = {}, None
    candidates = {"library_index_put": cache.update, "flat_index_copy": flat_index_copy(cache, eager=False),
                  "flat_index_copy_eager": flat_index_copy(cache, eager=True)}
    for name, update in candidates.items():
        def step(update=update):
            cache.bind(rows, pos, ls, write)
            out = update(("recurrent", 0), k=k, v=v)
            return out["k"].float().sum() + out["v"].float().sum()
        compiled = torch.compile(step, dynamic=False)
        with torch.inference_mode():
            value = float(compiled())
            results[name] = {"us": graph_time(compiled), "read_sum": value}
        reference = value if reference is None else reference
        results[name]["same_as_library"] = value == reference
        print(name, results[name], flush=True)
    write_report("cache_write", {"benchmark": "cache_write", "env": env_info(), "slots": B, "loop_slots": args.loops,
                                 "max_len": args.max_len, "repeats_per_graph": GRAPH_REPEATS,
                                 "k_and_v_buffer_MiB": buffer_mb, "results": results},
                 args.out)


if __name__ == "__main__":
    main()
