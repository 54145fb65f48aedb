"""The training loop: one `Trainer` for CPU, one GPU, and torchrun (DDP / FSDP2).

Each optimizer step:
  1. draw the loop count n and the loops with gradient k (LoopConfig.draw(seed, step): same on every
     rank, resume-exact)
  2. for each micro-batch: forward with n loops (gradient through the last k), token loss (next
     token, or a task's targets), backward (DDP syncs gradients on the last micro-batch only)
  3. unscale (fp16), clip, check loss and grad norm are finite — a non-finite step is skipped and
     counted; ``max_bad_steps`` in a row stop training with a clear error
  4. optimizer + scheduler step, then the MoE router-bias update from the expert load summed
     over ranks (aux-loss-free balancing)
Logged to ``metrics.jsonl``: loss, lr, grad norm, tokens/s (global and per GPU), MFU (per device), loops,
expert-load imbalance, ρ(A), mean ACT depth; held-out loss at ``eval_every``; a loop sweep at the end; every
rank prints its own throughput line. Under torchrun with ``step_graph`` the gradient all-reduce is part of the
forward graph (distributed.GradientAllReduce); with FSDP2 the step is the eager one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch.profiler import record_function
from tqdm import tqdm

from ..attention import attention_backends
from ..eval.perplexity import eval_mode, format_sweep, loop_sweep
from ..flops import flops_per_token, peak_flops
from ..loss import lm_loss
from ..model import OpenMythos
from .checkpoint import export_weights, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from ..tokenizer import load_tokenizer, save_tokenizer_name
from .data import build_loaders
from .distributed import (GradientAllReduce, all_reduce_, barrier, init_distributed, mean_across_ranks, unwrap,
                          wrap_model)
from .exit import exit_report, train_exit
from .graphs import StepGraphs
from .optim import build_optimizers, build_schedulers
from .speed import CUDAGRAPH_COMPILE_MODES, LoopRunner, compile_blocks


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


RUN_OUTPUTS = ("metrics.jsonl", "train_config.json", "sweep.json", "loss.png", "sweep.png", "checkpoints", "model")


class Trainer:
    """``resume``: continue from the newest complete checkpoint in ``cfg.out_dir``. ``overwrite``: start a new
    run there, deleting the previous run's outputs (RUN_OUTPUTS). Without either, a non-empty out_dir is
    an error: a second run would mix its metrics and checkpoints with the first's."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False):
        self.cfg = cfg
        self.info = init_distributed(cfg.device)
        self.run_dir = Path(cfg.out_dir)
        self._claim_run_dir(resume, overwrite)
        self.device = self.info.device
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.step_graph and (self.precision == "fp16" or (self.precision != "bf16" and self.device.type == "cuda")):
            raise ValueError("step_graph=true runs in bf16 on a GPU (the fp32 expert path reads its capacity on the "
                             f"host; fp16's GradScaler syncs); got precision {self.precision}")
        self.step_graph = cfg.step_graph
        if cfg.exit.steps and self.info.enabled and cfg.parallel == "fsdp":
            raise ValueError("exit.steps (the halting-unit phase) runs on one process or under parallel='ddp'; "
                             "FSDP2 shards the unit's parameters")
        if cfg.step_graph and self.info.enabled and cfg.parallel == "fsdp":
            self.step_graph = False  # FSDP2 gathers and reduce-scatters from hooks that run on the host
            self._log("step_graph=true is not available with parallel='fsdp' (FSDP2's hooks run on the host): "
                      "running the eager step; parallel='ddp' runs the whole step as CUDA graphs")
        self.progress = progress
        torch.manual_seed(cfg.seed)

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if cfg.data.source != "task" and cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the "
                             f"{cfg.data.tokenizer} tokenizer's vocabulary ({self.tokenizer.vocab_size})")
        self.train_loader, self.val_batches = build_loaders(cfg, self.tokenizer, self.info.rank, self.info.world_size)

        model = OpenMythos(cfg.model).to(self.device)
        if cfg.model.loop_output == "final":  # the halting unit is not in the loss: freeze it (DDP needs
            model.recurrent.act.requires_grad_(False)  # every trainable parameter to receive a gradient)
        self.loss_fn = lm_loss
        self.loop_runner = LoopRunner(checkpoint_loops=cfg.activation_checkpointing)  # how forward runs the loop
        if cfg.compile:
            self.loop_runner = compile_blocks(model, cfg.activation_checkpointing, mode=cfg.compile_mode)
            self.loss_fn = torch.compile(lm_loss, mode=cfg.compile_mode)  # fp32 cast + CE fused, not materialised
        self.model = wrap_model(model, self.info, cfg.parallel, step_graph=self.step_graph)
        # the graphed step's data parallelism: bucketed gradient all-reduces, inside the forward graph
        self.grad_sync = (GradientAllReduce(model, cfg.grad_bucket_mb) if self.step_graph and self.info.enabled
                          else None)
        if self.info.enabled and cfg.parallel == "fsdp":  # parameters are sharded outside the block's own forward
            self.loop_runner.cast_matrices_once = False
        self.optimizers = build_optimizers(unwrap(self.model), cfg.optim, compile=cfg.compile,
                                           capturable=self.step_graph,
                                           shard=cfg.optim.shard_muon and self.info.enabled and cfg.parallel == "ddp")
        self.schedulers = build_schedulers(self.optimizers, cfg.optim, cfg.steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        self.skipped_steps = 0
        self._flops: dict[int, float] = {}
        self._step_times: list[float] = []  # this rank's wall time of each step, seconds (throughput line)
        self._prefetched: tuple[dict, list] | None = None  # (loader position before them, next step's batches)
        self.metrics_records = 0  # lines in metrics.jsonl, saved with each checkpoint
        if resume and (ckpt := latest_checkpoint(self.run_dir)) is not None:
            self._restore(ckpt)
        elif resume:  # nothing to continue from: records of an attempt killed before its first checkpoint go
            self._truncate_metrics(0)
            self._log(f"--resume: no complete checkpoint in {self.run_dir}: starting at step 0")
        self.graphs = StepGraphs(self) if self.step_graph else None

    # ------------------------------------------------------------------ setup
    def _claim_run_dir(self, resume: bool, overwrite: bool) -> None:
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run in out_dir, or replace it")
        entries = sorted(p.name for p in self.run_dir.iterdir()) if self.run_dir.is_dir() else []
        if entries and not (resume or overwrite):
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ValueError(f"out_dir {self.run_dir} is not empty ({shown}): pass --resume to continue that run "
                             "or --overwrite to replace it")
        barrier()  # every rank has looked before the main one deletes or writes anything
        if overwrite and self.info.is_main:
            for name in RUN_OUTPUTS:
                path = self.run_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        barrier()

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _restore(self, ckpt: Path) -> None:
        state = load_checkpoint(ckpt, self.model, self.optimizers, self.info)
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.train_loader.load_state_dict(state["loader"])
        for sched, s in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(s)
        self.scaler.load_state_dict(state["scaler"])
        self._truncate_metrics(state.get("metrics_records"))
        self._log(f"resumed from {ckpt} at step {self.step}")

    def _truncate_metrics(self, n_records: int | None) -> None:
        """Keep the first ``n_records`` records of metrics.jsonl: those written before the checkpoint (evals at
        its step included); later ones are written again by the resumed run. None (a checkpoint of an older
        open-mythos, which did not count them): keep the records of earlier steps."""
        metrics = self.run_dir / "metrics.jsonl"
        if self.info.is_main and metrics.is_file():
            lines = [line for line in metrics.read_text().splitlines() if line.strip()]
            if n_records is None:
                lines = [line for line in lines if json.loads(line).get("step", 0) < self.step]
            else:
                lines = lines[:n_records]
            metrics.write_text("".join(line + "\n" for line in lines))
            self.metrics_records = len(lines)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        n_loops, backprop = cfg.loops.draw(cfg.seed, self.step)
        model.train()
        if cfg.compile and cfg.compile_mode in CUDAGRAPH_COMPILE_MODES:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's CUDA-graph outputs may be reused
        t0 = time.perf_counter()
        batches = self._next_batches()
        graphed = self.graphs is not None and self.graphs.ready(n_loops)
        if graphed:
            loss_sum, depth, grad_norm = self.graphs.forward_backward(n_loops, batches)
            self.graphs.update()  # launched before the host reads the loss: a non-finite step skips itself on device
        else:
            with self._uncaptured(n_loops):
                batches = [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                           for x, y in batches]
                loss_sum, depth = self.forward_backward(n_loops, batches, zero_grads=self.graphs is not None,
                                                        backprop_loops=backprop)
                self.reduce_gradients()
                grad_norm = self.clip_gradients()
        self._prefetch()  # the device is busy with this step: fetch the next one's batches meanwhile
        with record_function("optimizer"):
            loss_value = mean_across_ranks(loss_sum)
            finite = bool(torch.isfinite(loss_value) & torch.isfinite(grad_norm))
            if finite or self.scaler.is_enabled():  # fp16: the scaler skips inf steps and lowers its scale
                if not graphed:  # (a graphed step launched its update graph right after the forward graph)
                    if self.graphs is not None:
                        with self._uncaptured(n_loops, optimizer_step=True):
                            self.graphs.update(capture=False)  # the captured code path, run (and compiled) uncaptured
                    else:
                        for opt in self.optimizers:
                            self.scaler.step(opt)
                for sched in self.schedulers:
                    sched.step()
            self.scaler.update()
            if self.graphs is None:  # step_graph keeps static gradients, zeroed inside the forward graph
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
        base = unwrap(model)
        for m in base.moe_layers():
            all_reduce_(m.expert_load)
        load = base.update_router_bias()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self._step_times.append(dt)
        tokens = cfg.batch_size * cfg.data.seq_len  # the global batch: every rank's share together
        tok_s = tokens / dt
        peak = peak_flops(self.device)
        if n_loops not in self._flops:
            self._flops[n_loops] = flops_per_token(cfg.model, cfg.data.seq_len, n_loops)
        return {
            "step": self.step, "loss": float(loss_value), "finite": finite, "n_loops": n_loops,
            "lr": self.schedulers[-1].get_last_lr()[0], "grad_norm": float(grad_norm),
            "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s / self.info.world_size,
            "mfu": self._flops[n_loops] * tok_s / self.info.world_size / peak if peak else None,  # per device
            "load_imbalance": float(load.max() / load.mean()) if load.sum() > 0 else None,
            "rho_A": base.recurrent.injection.spectral_radius(),
            "act_depth": float(mean_across_ranks(depth)),
            "graphed": graphed,
        }

    def _next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This step's micro-batches: those prefetched during the previous step, else fetched now."""
        if self._prefetched is None:
            return [self.train_loader.next_batch() for _ in range(self.cfg.grad_accum)]
        batches, self._prefetched = self._prefetched[1], None
        return batches

    def _prefetch(self) -> None:
        """Fetch the next step's micro-batches (on the host, while the device runs this step: a fetch can take
        milliseconds on a busy host). A checkpoint saves the loader's position from before them."""
        position = self.train_loader.state_dict()
        self._prefetched = (position, [self.train_loader.next_batch() for _ in range(self.cfg.grad_accum)])

    def _uncaptured(self, n_loops: int, optimizer_step: bool = False):
        """Context for work outside CUDA graphs; with step_graph it warms up the graphs (graphs.py)."""
        return self.graphs.warmup(n_loops, optimizer_step) if self.graphs is not None else contextlib.nullcontext()

    def forward_backward(self, n_loops: int, batches: list[tuple[torch.Tensor, torch.Tensor]],
                         zero_grads: bool = False, backprop_loops: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward with ``n_loops`` loops, loss and backward over the micro-batches (on the device);
        gradients accumulate into ``.grad``. Returns the loss and the mean ACT depth, as tensors.
        ``zero_grads``: zero existing gradients first (step_graph keeps them allocated).
        ``backprop_loops``: gradient through the last k loops only (default: ``loops.backprop``)."""
        cfg, model = self.cfg, self.model
        if self.grad_sync is not None:
            self.grad_sync.attach()
        if zero_grads and (grads := [p.grad for p in model.parameters() if p.grad is not None]):
            torch._foreach_zero_(grads)
        backprop = backprop_loops or cfg.loops.backprop or None
        loss_sum = torch.zeros((), device=self.device)
        depth_sum = torch.zeros((), device=self.device)
        for micro, (x, y) in enumerate(batches):
            last = micro == len(batches) - 1
            if last and self.grad_sync is not None:
                self.grad_sync.arm()  # all-reduce gradient buckets as this backward finishes them
            sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
            with sync, attention_backends():
                with record_function("forward"), self.autocast():
                    logits, depth = model(x, n_loops, backprop_loops=backprop, return_act_depth=True,
                                          loop_runner=self.loop_runner)
                with record_function("loss"):
                    loss = self.loss_fn(logits, y) / len(batches)
                with record_function("backward"):
                    self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            depth_sum += depth.mean() / len(batches)
        return loss_sum, depth_sum

    def reduce_gradients(self) -> None:
        """The graphed step's data parallelism: average the gradients over ranks (DDP and FSDP2 reduce theirs
        during the backward; one process has nothing to do)."""
        if self.grad_sync is not None:
            self.grad_sync.reduce()

    def clip_gradients(self) -> torch.Tensor:
        """Unscale (fp16) and clip the gradients to ``optim.grad_clip``; returns their total norm."""
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        return torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)

    # ------------------------------------------------------------------ the run
    def evaluate(self, n_loops: int | None = None) -> float:
        n = n_loops or self.cfg.loops.mean
        return loop_sweep(unwrap(self.model), self.val_batches, [n], self.device, self.autocast)[0]["loss"]

    def train(self) -> dict:
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (info.is_main and self.progress),
                   desc="train", dynamic_ncols=True)
        bad_streak = 0
        while self.step < cfg.steps:
            rec = self.train_step()
            if rec["finite"]:
                bad_streak = 0
            else:
                bad_streak += 1
                self.skipped_steps += 1
                if bad_streak >= cfg.max_bad_steps:
                    raise RuntimeError(
                        f"training stopped at step {self.step}: {bad_streak} consecutive steps with a non-finite "
                        f"loss or gradient (loss={rec['loss']}, grad_norm={rec['grad_norm']}); lower optim.muon_lr / "
                        f"optim.adamw_lr, enable optim.grad_clip, or use precision=bf16/fp32")
            self.step += 1
            rec["skipped_steps"] = self.skipped_steps
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", loops=rec["n_loops"], tok_s=f"{rec['tokens_per_s']:.0f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._write_metrics(rec)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._write_metrics({"step": self.step, "val_loss": self.evaluate()})
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.checkpoint()
        bar.close()
        self._log_rank_throughput()
        self.checkpoint()
        return self.finish()

    def rank_throughput(self) -> dict:
        """This rank's throughput over the run's steps (median step time): tokens/s of its share of the global
        batch, and its MFU at the mean loop count."""
        dt = sorted(self._step_times)[len(self._step_times) // 2]
        tok_s = self.cfg.batch_size // self.info.world_size * self.cfg.data.seq_len / dt
        peak = peak_flops(self.device)
        flops = flops_per_token(self.cfg.model, self.cfg.data.seq_len, self.cfg.loops.mean)
        return {"rank": self.info.rank, "world_size": self.info.world_size, "device": str(self.device),
                "median_step_s": dt, "tokens_per_s": tok_s, "mfu": flops * tok_s / peak if peak else None}

    def _log_rank_throughput(self) -> None:
        """One line per rank (every rank prints its own): a slow device or host shows as a slow rank."""
        if not self._step_times:
            return
        r = self.rank_throughput()
        mfu = f", MFU {r['mfu']:.1%} at {self.cfg.loops.mean} loops" if r["mfu"] is not None else ""
        tqdm.write(f"rank {r['rank']}/{r['world_size']} ({r['device']}): {r['tokens_per_s']:,.0f} tokens/s "
                   f"(median step {r['median_step_s'] * 1e3:.1f} ms over {len(self._step_times)} steps){mfu}")

    def checkpoint(self) -> Path:
        loader = self._prefetched[0] if self._prefetched is not None else self.train_loader.state_dict()
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "loader": loader,
                 "schedulers": [s.state_dict() for s in self.schedulers], "scaler": self.scaler.state_dict(),
                 "metrics_records": self.metrics_records}
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizers, state, self.info,
                               self.cfg.keep_last)

    def train_exit(self) -> dict:
        """The halting-unit phase (``[exit]``, training/exit.py): ``exit.steps`` steps on the frozen model with
        training batches, labels from ``exit_loops`` loops; returns the held-out exit report after it and the
        objective before/after (also written to metrics.jsonl)."""
        cfg, model = self.cfg, unwrap(self.model)

        def batches():
            while True:
                for x, y in self._next_batches():
                    yield x.to(self.device), y.to(self.device)

        def reduce_grads(grads: list[torch.Tensor]) -> None:
            for g in grads:
                all_reduce_(g)
                g /= self.info.world_size

        report = functools.partial(exit_report, model, self.val_batches, cfg.exit_loops, cfg.exit.margin,
                                   model.act_threshold, autocast=self.autocast)
        before = report()
        history = train_exit(model, batches(), cfg.exit, cfg.exit_loops, self.autocast,
                             reduce_grads if self.info.enabled else None)
        summary = {"exit_steps": cfg.exit.steps, "exit_train_objective": history[-1]} | {
            f"exit_{k}": v for k, v in report().items()} | {"exit_objective_before": before["objective"],
                                                            "exit_act_depth_before": before["act_depth"]}
        self._write_metrics({"step": self.step} | summary)
        self._log(f"exit trained ({cfg.exit.steps} steps): held-out act rule {summary['exit_act_depth']:.2f} loops, "
                  f"loss {summary['exit_act_loss']:.4f} (full depth {summary['exit_loops']}: "
                  f"{summary['exit_full_loss']:.4f}; oracle {summary['exit_oracle_depth']:.2f} loops)")
        return summary

    def finish(self) -> dict:
        cfg = self.cfg
        # one-off passes reuse compiled graphs (a periodic eval's) but compile none: the training graphs do not serve
        # them (no-grad; a new shape per decoded token), and ~20 new graphs took minutes on a GPU
        one_off = functools.partial(torch.compiler.set_stance, "eager_on_recompile")
        with one_off():
            exit_summary = self.train_exit() if cfg.exit.steps else {}
        export_weights(self.model, self.run_dir / "model", self.info)
        if self.info.is_main:
            save_tokenizer_name(self.run_dir / "model", cfg.data.tokenizer)
        loops = sorted(set(cfg.sweep_loops or [1, 2, 2 * cfg.loops.mean, 4 * cfg.loops.mean]) | {cfg.loops.mean})
        with one_off():
            sweep = loop_sweep(unwrap(self.model), self.val_batches, loops, self.device, self.autocast)
        summary = {"steps": self.step, "skipped_steps": self.skipped_steps, "train_mean_loops": cfg.loops.mean,
                   "sweep": sweep} | exit_summary
        if self.info.is_main:
            self._write_metrics({"step": self.step, "val_loss": next(r["loss"] for r in sweep
                                                                     if r["n_loops"] == cfg.loops.mean)})
            (self.run_dir / "sweep.json").write_text(json.dumps(summary, indent=1))
            self._log("held-out loss by loop count (trained with mean "
                      f"{cfg.loops.mean} loops):\n{format_sweep(sweep)}")
            try:
                from ..plot import plot_run

                plot_run(self.run_dir)
            except ImportError:
                pass
        if cfg.sample_tokens > 0 and cfg.sample_prompt and cfg.model.vocab_size > self.tokenizer.vocab_size:
            self._log(f"sample skipped: ids {self.tokenizer.vocab_size}..{cfg.model.vocab_size - 1} of the model could "
                      f"be sampled but not decoded by the {cfg.data.tokenizer} tokenizer")
        elif cfg.sample_tokens > 0 and cfg.sample_prompt:  # every rank: FSDP2 gathers each block's shards on all
            with one_off():
                summary["sample"] = self.sample(cfg.sample_prompt, cfg.sample_tokens)
            self._log(f"sample ({cfg.loops.mean} loops): {cfg.sample_prompt}{summary['sample']}")
        return summary

    def sample(self, prompt: str, n_tokens: int) -> str:
        model = unwrap(self.model)
        ids = torch.tensor([self.tokenizer.encode(prompt)], device=self.device)
        with eval_mode(model), self.autocast():
            out = model.generate(ids, max_new_tokens=min(n_tokens, model.cfg.max_output_tokens),
                                 n_loops=self.cfg.loops.mean, temperature=0.8, top_k=40, seed=self.cfg.seed)
        return self.tokenizer.decode(out[0, ids.shape[1]:].tolist())

    def _write_metrics(self, rec: dict) -> None:
        if self.info.is_main:
            with (self.run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            self.metrics_records += 1

    def _log(self, msg: str) -> None:
        if self.info.is_main:
            tqdm.write(msg)
