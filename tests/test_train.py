"""The training pipeline end to end on CPU: tiny model, a few steps."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from open_mythos import OpenMythos
from open_mythos.training.config import LoopConfig, load_config
from open_mythos.training.loop import Trainer

TINY = ["steps=6", "batch_size=4", "log_every=1", "eval_batches=2", "sample_tokens=0",
        "model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_experts=4", "model.expert_dim=32",
        "model.max_seq_len=32", "model.lora_rank=2", "data.seq_len=16", "loops.mean=2", "loops.max_sampled=3",
        "loops.backprop=2", "optim.warmup_steps=2", "sweep_loops=[1, 2, 4]"]


def tiny_overrides(tmp_path, *extra):
    return [*TINY, f"out_dir='{tmp_path / 'run'}'", *extra]


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loop_sampling_is_bounded_deterministic_and_centred():
    cfg = LoopConfig(schedule="poisson_lognormal", mean=4, sigma=0.5, min_sampled=1, max_sampled=12)
    draws = [cfg.sample(seed=0, step=s) for s in range(2000)]
    assert min(draws) >= 1 and max(draws) <= 12
    assert draws == [cfg.sample(seed=0, step=s) for s in range(2000)]
    assert 3.5 < sum(draws) / len(draws) < 4.5
    assert LoopConfig(schedule="fixed", mean=3).sample(0, 5) == 3
    with pytest.raises(ValueError, match="loops.min_sampled"):
        LoopConfig(mean=2, min_sampled=3)


def test_config_presets_overrides_and_errors(tmp_path):
    cfg = load_config("shakespeare-tiny", overrides=["steps=7", "optim.muon_lr=0.01", "model.attn_type=mla"])
    assert (cfg.steps, cfg.optim.muon_lr, cfg.model.attn_type) == (7, 0.01, "mla")
    assert load_config("3b_fine_web_edu").data.source == "hf"
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("nope")
    with pytest.raises(ValueError, match="unknown field.*model"):
        load_config("shakespeare-tiny", overrides=["model.n_layerz=3"])
    with pytest.raises(ValueError, match="unknown training config key"):
        load_config("shakespeare-tiny", overrides=["stepz=3"])
    with pytest.raises(ValueError, match="steps must be of type int"):
        load_config("shakespeare-tiny", overrides=["steps=many"])
    with pytest.raises(ValueError, match="data.seq_len"):
        load_config("shakespeare-tiny", overrides=["data.seq_len=4096"])
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 3\n[optim]\nadamw_lr = 0.001\n")
    cfg = load_config("shakespeare-tiny", toml)
    assert cfg.steps == 3 and cfg.optim.adamw_lr == 0.001 and cfg.model.dim == 128


@pytest.mark.parametrize("override,field", [("eval_every=-1", "eval_every"), ("ckpt_every=-5", "ckpt_every"),
                                            ("sample_tokens=-1", "sample_tokens"), ("out_dir=''", "out_dir")])
def test_negative_intervals_and_an_empty_out_dir_are_refused(override, field):
    """eval_every=-1 passed validation and evaluated at every step (n % -1 == 0); out_dir='' meant the current
    directory."""
    with pytest.raises(ValueError, match=field):
        load_config("shakespeare-tiny", overrides=[override])


def test_trainer_end_to_end(tmp_path):
    cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(tmp_path, "steps=30", "eval_every=10",
                                                                   "sweep_loops=[1, 4]"))
    summary = Trainer(cfg, progress=False).train()
    rows = read_metrics(cfg.out_dir)
    train = [r for r in rows if "loss" in r]
    assert len(train) == 30 and train[-1]["loss"] < train[0]["loss"] - 0.5
    for key in ("lr", "grad_norm", "tokens_per_s", "n_loops", "load_imbalance", "rho_A", "act_depth"):
        assert key in train[-1]
    assert all(r["rho_A"] < 1 for r in train)
    assert [r["n_loops"] for r in summary["sweep"]] == [1, 2, 4]
    run = Path(cfg.out_dir)
    assert (run / "loss.png").is_file() and (run / "sweep.png").is_file()
    model = OpenMythos.from_pretrained(run / "model")  # the exported weights load without pickle
    assert model.cfg.dim == 32


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(tmp_path, "max_bad_steps=3"))
    trainer = Trainer(cfg, progress=False)
    real = trainer.loss_fn
    calls = {"n": 0}

    def flaky(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(trainer, "loss_fn", flaky)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    trainer.step += 1
    after_good = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    rec = trainer.train_step()  # the NaN step: skipped, weights untouched
    assert not rec["finite"]
    assert all(torch.equal(after_good[n], p) for n, p in trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after_good[n]) for n in before)
    monkeypatch.setattr(trainer, "loss_fn", lambda logits, labels: real(logits, labels) * float("inf"))
    with pytest.raises(RuntimeError, match="3 consecutive steps with a non-finite"):
        trainer.train()


def test_compiled_training_steps_match_eager(tmp_path):
    """compile=true (compiled blocks, loop iteration, loss and Newton-Schulz) trains like eager: same
    losses over steps that depend on every earlier update."""
    losses = {}
    for compiled in (False, True):
        cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(
            tmp_path / str(compiled), f"compile={str(compiled).lower()}", "loops.schedule='fixed'",
            "optim.muon_impl='batched'"))
        trainer = Trainer(cfg, progress=False)
        losses[compiled] = [trainer.train_step()["loss"] for _ in range(3)]
    assert losses[False][-1] < losses[False][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_step_graph_trains_like_the_eager_trainer(tmp_path):
    """step_graph=true (static gradients zeroed in the step, learning rates the update reads from tensors,
    one forward graph per loop count: here run uncaptured, on CPU) gives the eager trainer's losses and
    weights, over sampled loop counts and two micro-batches."""
    runs = {}
    for graph in (False, True):
        cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(
            tmp_path / str(graph), f"step_graph={str(graph).lower()}", "optim.muon_impl='batched'", "grad_accum=2"))
        trainer = Trainer(cfg, progress=False)
        recs = []
        for _ in range(5):
            recs.append(trainer.train_step())
            trainer.step += 1
        runs[graph] = (recs, trainer)
    (eager, t_eager), (graphed, t_graph) = runs[False], runs[True]
    assert len({r["n_loops"] for r in eager}) > 1  # several loop counts: several forward graphs
    assert [r["graphed"] for r in graphed] == [False, *[r["n_loops"] in {q["n_loops"] for q in graphed[:i]}
                                                        for i, r in enumerate(graphed) if i > 0]]
    assert [r["loss"] for r in graphed] == pytest.approx([r["loss"] for r in eager], rel=1e-5)
    assert [r["grad_norm"] for r in graphed] == pytest.approx([r["grad_norm"] for r in eager], rel=1e-4)
    for (name, p), q in zip(t_eager.model.named_parameters(), t_graph.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_step_graph_skips_a_non_finite_step(tmp_path, monkeypatch):
    cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(
        tmp_path, "step_graph=true", "optim.muon_impl='batched'", "loops.schedule='fixed'"))
    trainer = Trainer(cfg, progress=False)
    real = trainer.loss_fn
    trainer.train_step()
    monkeypatch.setattr(trainer, "loss_fn", lambda logits, labels: real(logits, labels) * float("nan"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    rec = trainer.train_step()
    assert rec["graphed"] and not rec["finite"]
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_step_graph_config_errors():
    with pytest.raises(ValueError, match="compile_mode='reduce-overhead' adds its own"):
        load_config("shakespeare-tiny", overrides=["step_graph=true", "optim.muon_impl='batched'",
                                                   "compile_mode='reduce-overhead'"])
    with pytest.raises(ValueError, match="muon_impl='batched'"):
        load_config("shakespeare-tiny", overrides=["step_graph=true", "optim.muon_impl='torch'"])


def test_compiled_bf16_training_with_activation_checkpointing(tmp_path):
    """Compiled, under bf16 autocast, activation checkpointing recomputes each loop and trains like without
    it (there the recurrent matrices are cast per loop: the recomputation sees the fp32 parameters)."""
    losses = {}
    for ckpt in (False, True):
        cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(
            tmp_path / str(ckpt), "compile=true", f"activation_checkpointing={str(ckpt).lower()}",
            "precision='bf16'", "optim.muon_impl='batched'", "loops.schedule='fixed'"))
        trainer = Trainer(cfg, progress=False)
        losses[ckpt] = [trainer.train_step()["loss"] for _ in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)


def test_activation_checkpointing_gives_the_same_gradients():
    from conftest import tiny_config

    from open_mythos.training.speed import LoopRunner

    model = OpenMythos(tiny_config())
    ids = torch.randint(0, 97, (2, 8))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model(ids, 3, loop_runner=LoopRunner(checkpoint_loops=ckpt)).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def _train_cmd(*overrides):
    return [sys.executable, "-m", "open_mythos.cli", "train", "--preset", "shakespeare-tiny", "--no-progress",
            *[a for o in overrides for a in ("--set", o)]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_resume_after_kill_9_is_bit_identical(tmp_path):
    common = [*TINY, "steps=40", "ckpt_every=2", "keep_last=2"]
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(*common, f"out_dir='{ref}'"), check=True, env=ENV, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(*common, f"out_dir='{run}'"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_00000006").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not any(p.name.endswith(".tmp") and p.is_dir() and (p / "trainer_state.json").exists()
                   for p in (run / "checkpoints").iterdir())
    subprocess.run(_train_cmd(*common, f"out_dir='{run}'") + ["--resume"], check=True, env=ENV, capture_output=True)
    losses = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r}  # noqa: E731
    assert losses(run) == losses(ref)  # exact float equality, every step
    assert len(losses(ref)) == 40
    assert len(list((run / "checkpoints").iterdir())) <= 3  # keep_last=2 (+ at most one .tmp leftover)


@pytest.mark.parametrize("parallel,step_graph", [("ddp", False), ("ddp", True), ("fsdp", True)])
def test_two_process_gloo_matches_single_process(tmp_path, parallel, step_graph):
    """2 gloo processes train like one at the same global batch: losses and gradient norms (the norm of the
    all-reduced gradient: under step_graph the flat all-reduce must come before the clip), and the end-of-run
    sample (every rank samples: FSDP2 hung when rank 0 alone ran the model). step_graph under
    FSDP2 falls back to the eager step with a message."""
    common = [*TINY, "steps=4", f"parallel='{parallel}'", "sample_tokens=4", "optim.muon_impl='batched'",
              f"step_graph={str(step_graph).lower()}", "grad_bucket_mb=0.01"]  # step_graph + ddp: many buckets
    single = tmp_path / "single"
    subprocess.run(_train_cmd(*common, f"out_dir='{single}'"), check=True, env=ENV, capture_output=True)
    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "open_mythos.cli", "train", "--preset", "shakespeare-tiny", "--no-progress",
           *[a for o in (*common, f"out_dir='{multi}'") for a in ("--set", o)]]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("not available with parallel='fsdp'" in res.stdout) == (step_graph and parallel == "fsdp")
    assert all(f"rank {r}/2 (cpu): " in res.stdout for r in (0, 1))  # the per-rank throughput line
    assert any(r["graphed"] for r in read_metrics(multi) if "loss" in r) == (step_graph and parallel == "ddp")
    a = [r for r in read_metrics(single) if "loss" in r]
    b = [r for r in read_metrics(multi) if "loss" in r]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4 * max(1.0, abs(x["loss"])), (a, b)
        assert y["tokens_per_s_per_gpu"] == pytest.approx(y["tokens_per_s"] / 2)
    # step 0, equal weights: the norm of the mean gradient (a rank's own gradient has a different norm); later
    # steps differ by bf16 Newton-Schulz rounding of reduction-order differences (~1e-3)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-5)
    assert [y["grad_norm"] for y in b] == pytest.approx([x["grad_norm"] for x in a], rel=3e-3)


def test_sharded_muon_checkpoints_resume_across_world_sizes(tmp_path):
    """The graphed DDP step with sharded Muon (the default under torchrun): a 1-process checkpoint resumed on 2
    processes, and that run's checkpoint resumed on 1 again, continue the uninterrupted 1-process loss curve (the
    momentum stays whole on every rank, so every checkpoint holds all of it)."""
    import shutil

    common = [*TINY, "steps=6", "ckpt_every=2", "keep_last=5", "optim.muon_impl='batched'", "step_graph=true",
              "grad_bucket_mb=0.01", "loops.schedule='fixed'"]

    def resume_from(src, step, dst):
        name = f"step_{step:08d}"
        shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)

    one, two, back = tmp_path / "one", tmp_path / "two", tmp_path / "back"
    subprocess.run(_train_cmd(*common, f"out_dir='{one}'"), check=True, env=ENV, capture_output=True)
    resume_from(one, 2, two)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "open_mythos.cli", "train", "--preset", "shakespeare-tiny", "--no-progress", "--resume",
           *[a for o in (*common, f"out_dir='{two}'") for a in ("--set", o)]]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    resume_from(two, 4, back)
    subprocess.run(_train_cmd(*common, f"out_dir='{back}'") + ["--resume"], check=True, env=ENV, capture_output=True)
    losses = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r}  # noqa: E731
    ref, resumed_on_two, resumed_on_one = losses(one), losses(two), losses(back)
    assert sorted(resumed_on_two) == [2, 3, 4, 5] and sorted(resumed_on_one) == [4, 5]
    for step, loss in [*resumed_on_two.items(), *resumed_on_one.items()]:
        assert abs(loss - ref[step]) < 1e-4 * max(1.0, abs(ref[step])), (step, loss, ref[step])


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    results = []
    for accum in (1, 2):
        overrides = tiny_overrides(tmp_path, f"grad_accum={accum}", "loops.schedule='fixed'",
                                   f"out_dir='{tmp_path / str(accum)}'")
        cfg = load_config("shakespeare-tiny", overrides=overrides)
        trainer = Trainer(cfg, progress=False)
        trainer.train_loader.shuffle = False  # same windows in the same order for both
        recs = []
        for _ in range(3):
            recs.append(trainer.train_step())
            trainer.step += 1
        results.append(recs)
    for a, b in zip(*results):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"]), (a["loss"], b["loss"])
    assert abs(results[0][0]["grad_norm"] - results[1][0]["grad_norm"]) < 1e-4 * results[0][0]["grad_norm"]


def test_plot_cli(tmp_path, capsys):
    from open_mythos.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 9)))
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").is_file()
    assert main(["plot", str(tmp_path / "empty")]) == 2


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_runs_and_learns(tmp_path, precision):
    cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(tmp_path, "steps=12", f"precision='{precision}'"))
    trainer = Trainer(cfg, progress=False)
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    losses = []
    for _ in range(12):
        rec = trainer.train_step()
        trainer.step += 1
        losses.append(rec["loss"])
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0] - 0.3
    assert next(trainer.model.parameters()).dtype == torch.float32  # fp32 master weights


BUCKET_MB = (0.0, 0.01)  # one all-reduce after the backward; many buckets launched during it


def _gradient_all_reduce_worker(rank: int, init_file: str, out: dict) -> None:
    import torch.distributed as dist

    from conftest import tiny_config
    from open_mythos.training.distributed import GradientAllReduce

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ids = torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(0))
        mine = ids[rank::2]
        for bucket_mb in BUCKET_MB:
            torch.manual_seed(rank)  # different weights per rank: the constructor must broadcast rank 0's
            model = OpenMythos(tiny_config())
            sync = GradientAllReduce(model, bucket_mb)
            for last, micro in enumerate((mine[:1], mine[1:])):  # two micro-batches: the last launches buckets
                sync.attach()
                if last:
                    sync.arm()
                model(micro, 2).float().square().mean().backward()
            launched_in_backward = len(sync.works)
            sync.reduce()
            names = {p: n for n, p in model.named_parameters()}
            out[(rank, bucket_mb)] = {
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "launched": launched_in_backward,
                "members": [[names[p] for p in sync.params if sync.bucket_of[p] == b]
                            for b in range(len(sync.buckets))],
                "weights": {n: t.clone() for n, t in model.state_dict().items()}}
    finally:
        dist.destroy_process_group()


def test_gradient_all_reduce_averages_gradients_during_the_backward(tmp_path):
    """The step graph's data parallelism (GradientAllReduce, 2 gloo processes): every gradient ends as the mean
    of the ranks' gradients, equal to one process's gradient of the mean loss over both ranks' rows; with
    buckets, every bucket's all-reduce is launched inside the last micro-batch's backward (overlapped), with
    bucket_mb=0 none is (one all-reduce after it)."""
    import torch.multiprocessing as mp

    from conftest import tiny_config

    out = mp.Manager().dict()
    mp.spawn(_gradient_all_reduce_worker, args=(str(tmp_path / "init"), out), nprocs=2)
    for bucket_mb in BUCKET_MB:
        r0, r1 = out[(0, bucket_mb)], out[(1, bucket_mb)]
        for n in r0["weights"]:
            assert torch.equal(r0["weights"][n], r1["weights"][n]), n  # rank 0's weights everywhere
        model = OpenMythos(tiny_config())
        model.load_state_dict(r0["weights"])
        ids = torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(0))
        loss = sum(model(ids[r::2][m], 2).float().square().mean() for r in (0, 1) for m in (slice(0, 1), slice(1, 2)))
        (loss / 2).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(r0["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
                assert torch.equal(r0["grads"][n], r1["grads"][n]), n
        used = {n for n, p in model.named_parameters() if p.grad is not None}
        complete = sum(set(m) <= used for m in r0["members"])  # buckets whose every parameter gets a gradient
        if bucket_mb > 0:  # each launched by the backward; a bucket with an unused parameter, after it
            assert len(r0["members"]) > 3 and complete > 3 and r0["launched"] == complete
        else:
            assert len(r0["members"]) == 1 and r0["launched"] == 0


def test_mfu_is_per_device(tmp_path, monkeypatch):
    """tokens_per_s is the global batch over the step time; MFU divides it by the world size (the logged MFU used
    to multiply by it), and the per-rank line counts this rank's share of the batch."""
    from open_mythos.flops import flops_per_token
    from open_mythos.training import loop

    cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(tmp_path, "loops.schedule='fixed'"))
    trainer = Trainer(cfg, progress=False)
    monkeypatch.setattr(loop, "peak_flops", lambda device: 1e12)
    trainer.info.world_size = 2  # as rank 0 of 2 would log it (mfu and the per-GPU rate only read the world size)
    rec = trainer.train_step()
    per_gpu = rec["tokens_per_s"] / 2
    assert rec["tokens_per_s_per_gpu"] == pytest.approx(per_gpu)
    assert rec["mfu"] == pytest.approx(flops_per_token(cfg.model, cfg.data.seq_len, rec["n_loops"]) * per_gpu / 1e12)
    line = trainer.rank_throughput()
    assert line["tokens_per_s"] == pytest.approx(cfg.batch_size // 2 * cfg.data.seq_len / trainer._step_times[0])


def test_eval_records_at_a_checkpoint_step_survive_a_resume(tmp_path, monkeypatch):
    """Killed right after the checkpoint at step 4 (its eval already written), the resumed run's metrics
    are the uninterrupted run's records, evals included."""
    common = [*TINY, "steps=6", "eval_every=2", "ckpt_every=2", "sweep_loops=[2]"]
    ref = load_config("shakespeare-tiny", overrides=[*common, f"out_dir='{tmp_path / 'ref'}'"])
    Trainer(ref, progress=False).train()
    cfg = load_config("shakespeare-tiny", overrides=[*common, f"out_dir='{tmp_path / 'run'}'"])
    save = Trainer.checkpoint

    def checkpoint_then_die(self):
        path = save(self)
        if self.step == 4:
            raise KeyboardInterrupt  # killed after the save, before step 5
        return path

    monkeypatch.setattr(Trainer, "checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, progress=False).train()
    monkeypatch.setattr(Trainer, "checkpoint", save)
    Trainer(cfg, resume=True, progress=False).train()
    clock = ("tokens_per_s", "tokens_per_s_per_gpu", "mfu")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in clock} for r in rows]  # noqa: E731
    assert strip(read_metrics(cfg.out_dir)) == strip(read_metrics(ref.out_dir))
    assert [r["step"] for r in read_metrics(ref.out_dir) if "val_loss" in r] == [2, 4, 6]


def test_a_second_run_into_a_used_out_dir_needs_resume_or_overwrite(tmp_path, capsys):
    from open_mythos.cli import main

    args = ["train", "--preset", "shakespeare-tiny", "--no-progress",
            *[a for o in tiny_overrides(tmp_path, "steps=1", "sweep_loops=[2]") for a in ("--set", o)]]
    assert main(args) == 0
    run = tmp_path / "run"
    first = (run / "metrics.jsonl").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mythos: error: out_dir {run} is not empty") and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == first  # untouched
    (run / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 0
    assert (run / "metrics.jsonl").read_text().count("\n") == first.count("\n")  # replaced, not appended
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own outputs are deleted
    assert main([*args, "--resume", "--overwrite"]) == 2


def test_resume_without_a_checkpoint_says_it_starts_at_step_0(tmp_path, capsys):
    """--resume on an out_dir with no complete checkpoint (a typo in out_dir, a run killed before its first
    save) trains from scratch: it says so, rather than looking like a resumed run."""
    trainer = Trainer(load_config("shakespeare-tiny", overrides=tiny_overrides(tmp_path, "steps=1")),
                      resume=True, progress=False)
    assert trainer.step == 0
    out = capsys.readouterr().out
    assert f"no complete checkpoint in {tmp_path / 'run'}" in out and "step 0" in out


def test_activation_checkpointing_trains_identically(tmp_path):
    """The recomputation in backward re-runs the MoE; its expert load is counted once, so the router bias
    after 3 steps (and every weight) is the same with activation checkpointing on or off."""
    from conftest import tiny_config
    from open_mythos.training.speed import LoopRunner

    model = OpenMythos(tiny_config(n_experts_per_tok=2)).train()
    model(torch.randint(0, 97, (1, 4)), 2, backprop_loops=1,
          loop_runner=LoopRunner(checkpoint_loops=True)).sum().backward()
    assert sum(m.expert_load.sum().item() for m in model.moe_layers()) == 4 * 2 * 2  # tokens x top-k x loops
    trained = {}
    for ckpt in (False, True):
        overrides = tiny_overrides(tmp_path / str(ckpt), "steps=3", "loops.backprop=1",
                                   f"activation_checkpointing={str(ckpt).lower()}")
        cfg = load_config("shakespeare-tiny", overrides=overrides)
        trainer = Trainer(cfg, progress=False)
        for _ in range(3):
            trainer.train_step()
            trainer.step += 1
        trained[ckpt] = unwrap_state(trainer)
    for name in trained[False]:
        torch.testing.assert_close(trained[True][name], trained[False][name], msg=name, rtol=0, atol=0)
    assert any("router_bias" in n and trained[False][n].abs().sum() > 0 for n in trained[False])


def unwrap_state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_a_bad_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = \n")
    with pytest.raises(ValueError, match=r"bad\.toml: not valid TOML"):
        load_config(path=bad)
    with pytest.raises(ValueError, match=r"missing\.toml: config file not found"):
        load_config(path=tmp_path / "missing.toml")


def test_end_of_run_sample_is_skipped_when_the_tokenizer_cannot_decode_every_id(tmp_path, capsys):
    """A model wider than its tokenizer (the SPEC config on bytes) would sample undecodable ids: the run must
    still finish, with the sample skipped and said so."""
    cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(tmp_path, "steps=2", "model.vocab_size=300",
                                                                   "sample_tokens=8", "sweep_loops=[1]"))
    summary = Trainer(cfg, progress=False).train()
    assert "sample" not in summary and "sample skipped: ids 257..299" in capsys.readouterr().out


def test_the_end_of_run_sample_runs_the_model_in_eval_mode(tmp_path):
    """Trainer.sample draws from the model in eval mode (no dropout, no MoE load counted) and leaves it in the mode
    it found: with dropout 0.5 it equals sampling the eval-mode model with the same seed (it sampled in train mode)."""
    from open_mythos.moe import MoE

    cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(tmp_path, "model.dropout=0.5"))
    trainer = Trainer(cfg, progress=False)
    model = trainer.model.train()
    ids = torch.tensor([trainer.tokenizer.encode("ROMEO.")])
    with torch.no_grad():
        ref = model.eval().generate(ids, 16, cfg.loops.mean, temperature=0.8, top_k=40, seed=cfg.seed)
    model.train()
    assert trainer.sample("ROMEO.", 16) == trainer.tokenizer.decode(ref[0, ids.shape[1]:].tolist())
    assert model.training
    assert all(float(m.expert_load.sum()) == 0 for m in model.modules() if isinstance(m, MoE))
