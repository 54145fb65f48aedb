"""`mythos` command line: wires the library together, holds no model logic."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from .config import MythosConfig
from .inference.engine import SCHEDULE_ALIASES, SCHEDULES
from .inference.exit import EXIT_KINDS
from .checks import DTYPES, parse_device, parse_dtype
from .model import OpenMythos
from .tokenizer import ByteTokenizer
from .variants import VARIANTS, count_parameters


def demo_config() -> MythosConfig:
    """A small byte-level model that builds and runs in seconds on a CPU."""
    return MythosConfig(vocab_size=ByteTokenizer.vocab_size, dim=128, n_heads=4, n_kv_heads=2, max_seq_len=256,
                        max_loop_iters=4, prelude_layers=1, coda_layers=1, attn_type="mla", kv_lora_rank=64,
                        q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_experts=16,
                        n_shared_experts=1, n_experts_per_tok=2, expert_dim=64, lora_rank=8, max_output_tokens=64)


def cmd_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    cfg = demo_config()
    model = OpenMythos(cfg).eval()
    tok = ByteTokenizer()
    counts = count_parameters(cfg)
    print(f"OpenMythos demo: {counts['total']:,} parameters ({counts['active']:,} active per token), "
          f"attn={cfg.attn_type}, {cfg.n_experts} experts top-{cfg.n_experts_per_tok}")
    print(f"spectral radius rho(A) = {model.recurrent.injection.spectral_radius():.4f}  (< 1 by construction)")
    ids = torch.tensor([tok.encode(args.prompt)])
    with torch.no_grad():
        for n_loops in (1, 2, 4, 8):
            t0 = time.perf_counter()
            logits, depth = model(ids, n_loops, return_act_depth=True)
            ms = 1000 * (time.perf_counter() - t0)
            print(f"  n_loops={n_loops:2d}  logits {tuple(logits.shape)}  mean ACT depth {depth.mean():.2f}  "
                  f"{ms:6.1f} ms")
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, n_loops=4, temperature=0.8, top_k=40,
                         seed=args.seed)
    print(f"generated (untrained weights, so bytes are noise): {tok.decode(out[0, ids.shape[1]:].tolist())!r}")
    return 0


def load_model(args: argparse.Namespace):
    """(model, tokenizer) from ``--model DIR`` (a save_pretrained directory) or ``--demo``."""
    from .tokenizer import tokenizer_for

    dtype, device = parse_dtype(args.dtype, "--dtype"), parse_device(args.device, "--device")
    if args.demo:
        torch.manual_seed(0)  # the demo model is the same random model every time
        return OpenMythos(demo_config()).to(device=device, dtype=dtype).eval(), ByteTokenizer()
    if not args.model:
        raise ValueError("give --model DIR (a save_pretrained / training run's model directory) or --demo")
    inner = Path(args.model) / "model"
    if not (Path(args.model) / "config.json").is_file() and (inner / "config.json").is_file():
        raise FileNotFoundError(f"{args.model} is a training run, not a saved model: pass --model {inner}")
    model = OpenMythos.from_pretrained(args.model, device=device, dtype=dtype)
    return model, tokenizer_for(args.model, model.cfg.vocab_size)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="a save_pretrained directory (e.g. runs/NAME/model)")
    p.add_argument("--demo", action="store_true", help="a random tiny byte-level model instead of --model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to run on")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight and compute dtype")
    p.add_argument("--loop-policy", choices=["per_loop", "shared"], default="per_loop",
                   help="recurrent KV cache: per_loop (exact) or shared (one slot for all loops, less memory; "
                        "docs/inference.md)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")


def printable(text: str) -> str:
    """``text`` with control characters (ESC, BEL, ...) escaped, so a random model cannot drive the
    terminal; newlines and tabs are kept."""
    return "".join(c if c.isprintable() or c in "\n\t" else ascii(c)[1:-1] for c in text)


def cmd_generate(args: argparse.Namespace) -> int:
    from .inference import Engine, ExitRule, Request
    from .inference.text import generate_text
    from .sampling import SamplingParams

    if args.n_loops is not None and args.n_loops < 1:
        raise ValueError(f"--n-loops must be >= 1 (recurrent iterations per token), got {args.n_loops}")
    model, tok = load_model(args)
    engine = Engine(model, max_batch=args.max_batch, loop_policy=args.loop_policy,
                    max_loop_budget=max(args.n_loops or 0, model.cfg.max_loop_iters))
    rule = ExitRule(args.exit, args.exit_threshold, args.min_loops)
    if rule.kind == "act" and model.recurrent.act.is_constant():
        print("warning: this model's ACT halting unit was never trained (its weights are zero), so --exit act stops "
              "every token at the same depth; train it with [exit] (docs/training.md) or use --exit kl",
              file=sys.stderr)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    prompts = args.prompt or ["To be, or not to be"]
    requests = [Request(tok.encode(text), args.max_new_tokens, args.n_loops, sampling, rule, (tok.eos_token_id,),
                        args.seed) for text in prompts]
    show = printable if sys.stdout.isatty() else str
    live = len(prompts) == 1  # one prompt: stream its text as it is generated
    echoed = False  # the prompt is echoed with the first piece: a request the engine rejects prints nothing

    def on_piece(i: int, piece: str) -> None:
        nonlocal echoed
        if not echoed:
            print(show(prompts[0]), end="")
            echoed = True
        print(show(piece), end="", flush=True)

    t0 = time.perf_counter()
    texts = generate_text(engine, tok, requests, [args.stop] * len(prompts), on_piece=on_piece if live else None)
    seconds = time.perf_counter() - t0
    if live:
        print("" if echoed else show(prompts[0]), flush=True)
    else:
        for text, completion in zip(prompts, texts):
            print(json.dumps({"prompt": text, "completion": completion}))
    hist = dict(sorted(engine.depth_histogram.items()))
    n = engine.stats["tokens"]
    print(f"[{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s, "
          f"loop depth histogram {hist}]", file=sys.stderr)
    return 0


def served_name(model_dir: str) -> str:
    """The model id clients send: the directory's name, or the run's name for a run's ``model/``
    (``runs/shakespeare-tiny/model`` -> ``shakespeare-tiny``)."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: F401  (the [serve] extra: main() turns a missing one into an install hint)

    from .inference import Engine
    from .serving import build_app, make_server

    model, tok = load_model(args)
    engine = Engine(model, max_batch=args.max_batch, loop_policy=args.loop_policy,
                    max_loop_budget=args.max_loop_budget, schedule=args.schedule, sync_every=args.sync_every,
                    prefill_batch=args.prefill_batch)
    if engine.graphs is not None and not args.no_warmup:  # capture every CUDA graph before clients arrive
        t0 = time.perf_counter()
        shapes = engine.warmup()
        print(f"[warm-up: {shapes} batch/prompt shapes captured in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    name = args.model_name or ("open-mythos-demo" if args.demo else served_name(args.model))
    app = build_app(engine, tok, name, max_pending=args.max_pending, max_body_bytes=int(args.max_body_mb * 2 ** 20))
    make_server(app, args.host, args.port, args.graceful_timeout, log_level="info").run()
    return 0


# experiment name -> (module under experiments/, its entry point (preset, out_dir, overrides, progress=...))
EXPERIMENTS = {"khop": ("khop", "run"), "prefix-sums": ("prefix_sums", "run"), "p-hop": ("phop", "run"),
               "loops": ("scaling", "run_loops"), "dense-vs-looped": ("scaling", "run_dense_vs_looped")}


def cmd_experiment(args: argparse.Namespace) -> int:
    if args.rows and args.name != "ablate":
        raise ValueError(f"--rows applies to ablate only (the recurrence-recipe rows), not to {args.name}")
    out = Path(args.out or f"runs/experiment-{args.name}-{args.preset}")
    if args.name == "ablate":
        from .experiments.ablate import run_ablation

        run_ablation(args.preset, out, args.set, args.rows.split(",") if args.rows else None,
                     progress=not args.no_progress)
    else:
        module, entry = EXPERIMENTS[args.name]
        run = getattr(importlib.import_module(f".experiments.{module}", __package__), entry)
        run(args.preset, out, args.set, progress=not args.no_progress)
    print(f"results and plots in {out}")
    if args.preset == "cpu":  # next to the table it qualifies
        print("preset cpu: a smoke test of the pipeline (tiny models, minutes on a CPU); its numbers do not "
              "test the claim. The GPU preset's results: docs/experiments.md")
    return 0


def cmd_variants(args: argparse.Namespace) -> int:
    rows = []
    for name, make in VARIANTS.items():
        cfg = make()
        c = count_parameters(cfg)
        rows.append({"variant": name, "dim": cfg.dim, "experts": cfg.n_experts, "expert_dim": cfg.expert_dim,
                     "loops": cfg.max_loop_iters, "context": cfg.max_seq_len,
                     "max_output": cfg.max_output_tokens, "total_params": c["total"], "active_params": c["active"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'variant':<12}{'dim':>7}{'experts':>9}{'exp dim':>9}{'loops':>7}{'context':>10}{'max out':>9}"
          f"{'total':>10}{'active':>9}")
    for r in rows:
        print(f"{r['variant']:<12}{r['dim']:>7}{r['experts']:>9}{r['expert_dim']:>9}{r['loops']:>7}"
              f"{r['context']:>10}{r['max_output']:>9}{r['total_params'] / 1e9:>9.2f}B"
              f"{r['active_params'] / 1e9:>8.2f}B")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.config import list_presets, load_config
    from .training.distributed import shutdown
    from .training.loop import Trainer

    if args.preset is None and args.config is None:
        raise ValueError("train needs --preset NAME or --config FILE.toml; presets: "
                         f"{', '.join(list_presets())} (shakespeare-tiny: ~1 min on a CPU; see mythos train --help)")
    cfg = load_config(args.preset, args.config, args.set)
    try:
        summary = Trainer(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite).train()
    finally:
        shutdown()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in summary.items() if k != "sample"}))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    made = plot_run(args.run_dir)
    if not made:
        raise ValueError(f"nothing to plot in {args.run_dir} (no metrics.jsonl or sweep.json)")
    print("\n".join(str(p) for p in made))
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except the empty ones (None, False, []); epilogs keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        empty = action.default is None or action.default is False or action.default == []
        if empty or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def presets_help() -> str:
    """``mythos train --help``'s list of presets, each with the first line of its TOML comment."""
    import re

    from .training.config import list_presets, load_config, presets_dir

    lines = ["presets (mythos train --preset NAME):"]
    for name in list_presets():
        first = (presets_dir() / f"{name}.toml").read_text().splitlines()[0].lstrip("# ")
        cfg = load_config(name)
        lines.append(f"  {name:<17} {re.split(r'[.:] ', first)[0]}\n{'':<20}dim {cfg.model.dim}, "
                     f"{cfg.model.n_experts} experts, {cfg.steps} steps, data.source={cfg.data.source}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mythos", description="open-mythos: Recurrent-Depth Transformer")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: MYTHOS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, formatter_class=HelpFormatter)
    p = add("demo", help="build a small model, run it at several loop counts, generate")
    p.add_argument("--prompt", default="To be, or not to be", help="the text the random model continues")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the sampling")
    p.set_defaults(func=cmd_demo)
    p = add("variants", help="table of the pre-configured scales with parameter counts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_variants)
    p = add("train", help="train a model (single process or under torchrun)", epilog=presets_help(),
            description="Train from a preset and/or a TOML file, with --set overrides (docs/training.md).")
    p.add_argument("--preset", metavar="NAME", help="a preset (listed below)")
    p.add_argument("--config", metavar="FILE", help="a TOML file (applied after the preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set steps=100 --set optim.muon_lr=0.01")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a non-empty out_dir, deleting the previous run's outputs there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=cmd_train)
    p = add("generate", help="generate text with the inference engine: one prompt streams, several print JSON lines")
    add_model_args(p)
    p.add_argument("--prompt", action="append",
                   help="a prompt (repeat for a batch; one prompt streams, several print one JSON line each) "
                        "(default: 'To be, or not to be')")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--n-loops", type=int, default=None,
                   help="loop budget per token, >= 1; may exceed the trained depth (default: the model's "
                        "max_loop_iters)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--exit", choices=EXIT_KINDS, default="none",
                   help="per-token early-exit rule (docs/inference.md)")
    p.add_argument("--exit-threshold", type=float, default=None,
                   help="the rule's threshold (default: act the config's act_threshold, rel_change 1e-2, kl 5e-4)")
    p.add_argument("--min-loops", type=int, default=1, help="loops every token runs before its exit rule applies")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.set_defaults(func=cmd_generate)
    p = add("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn) on the engine")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model-name", help="the model id clients use (default: the directory's name; a run's "
                                        "model/ is named after the run: runs/NAME/model -> NAME)")
    p.add_argument("--max-loop-budget", "--max-loops", dest="max_loop_budget", type=int, default=None,
                   help="largest per-request loop budget n_loops; deeper than trained is allowed (default: the "
                        "model's max_loop_iters; --max-loops is the old spelling)")
    p.add_argument("--schedule", choices=[*SCHEDULES, *SCHEDULE_ALIASES], default="continuous",
                   help="continuous: whole tokens, requests join every token (\"token\" is the old name); depth: "
                        "continuous depth-wise batching; static: whole batches")
    p.add_argument("--sync-every", type=int, default=1, help="depth schedule: loop iterations per tick (per host sync)")
    p.add_argument("--prefill-batch", type=int, default=1,
                   help="depth/continuous schedule: prefill waiting requests this many at a time, ahead of need "
                        "(n-1 standby cache rows)")
    p.add_argument("--max-pending", type=int, default=256, help="requests in flight before answering 429")
    p.add_argument("--no-warmup", action="store_true",
                   help="on a GPU: skip capturing every batch/prompt shape at start-up")
    p.add_argument("--graceful-timeout", type=int, default=30,
                   help="seconds to finish in-flight work on shutdown; what still runs then ends with finish_reason "
                        "\"abort\"")
    p.add_argument("--max-body-mb", type=float, default=8, help="request bodies larger than this get 413")
    p.set_defaults(func=cmd_serve)
    p = add("experiment", help="evidence experiments: khop, prefix-sums, p-hop, loops, dense-vs-looped, ablate "
                               "(docs/experiments.md)")
    p.add_argument("name", choices=[*EXPERIMENTS, "ablate"],
                   help="khop: k-hop extrapolation; prefix-sums: 32-bit to 512-bit prefix parity (Bansal et al. "
                        "2022); p-hop: p-hop induction, 1 block looped 6 times vs once (Saunshi et al. 2025); "
                        "loops: held-out loss vs loops; dense-vs-looped: looped vs parameter- and FLOP-matched "
                        "fixed depth; ablate: the recurrence-recipe ablation")
    p.add_argument("--rows", help="ablate: comma-separated row names (default: all; see experiments/ablate.py)")
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: a smoke test in minutes (tiny models, too small to show the effect); "
                        "gpu: the measured setup (docs/experiments.md)")
    p.add_argument("--out", help="output directory (default runs/experiment-NAME-PRESET)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_experiment)
    p = add("plot", help="PNG plots (loss curve, loop sweep) of a training run directory")
    p.add_argument("run_dir", help="a training run's out_dir (holds metrics.jsonl, sweep.json)")
    p.set_defaults(func=cmd_plot)
    return parser


# the optional extra (pyproject.toml) that installs each optional import
EXTRAS = {"datasets": "data", "fastapi": "serve", "uvicorn": "serve", "openai": "serve", "transformers": "hf",
          "lm_eval": "eval"}


def error_line(err: Exception) -> str:
    """The one-line message for an error the user can fix (bad input, a missing file or extra, no network)."""
    if isinstance(err, ModuleNotFoundError):
        extra = EXTRAS.get((err.name or "").partition(".")[0])
        hint = f"pip install -e '.[{extra}]' (or pip install 'open-mythos[{extra}]')" if extra else \
            f"pip install {err.name}"
        return f"the {err.name} package is not installed: {hint}"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors a user can fix print one line, ``mythos: error: ...``, and return 2;
    ``--debug`` (or ``MYTHOS_DEBUG=1``) shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
            ModuleNotFoundError, ConnectionError) as err:
        if args.debug or os.environ.get("MYTHOS_DEBUG", "") not in ("", "0"):
            raise
        print(f"mythos: error: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
