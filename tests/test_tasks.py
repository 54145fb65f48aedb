"""The recipe pieces for easy-to-hard training: the progressive loop schedule, the 1-loop warm-up, and
synthetic tasks as a resumable Trainer data source."""


import pytest
import torch

from open_mythos.training.config import LoopConfig, load_config
from open_mythos.training.data import DataConfig
from open_mythos.training.loop import Trainer
from open_mythos.training.tasks import TaskLoader, build_task


def test_progressive_schedule_draws_bansals_random_start_and_gradient_loops():
    cfg = LoopConfig(schedule="progressive", mean=2, min_sampled=1, max_sampled=4)
    draws = [cfg.draw(seed=3, step=s) for s in range(3000)]
    assert draws == [cfg.draw(seed=3, step=s) for s in range(3000)]  # a function of (seed, step)
    # every (detached start n in 0..m-1, gradient loops k in 1..m-n) occurs, and nothing else
    expected = {(n + k, k) for n in range(4) for k in range(1, 5 - n)}
    assert set(draws) == expected
    starts = [loops - grad for loops, grad in draws]
    assert all(abs(starts.count(n) / 3000 - 0.25) < 0.04 for n in range(4))  # n ~ U{0..m-1}
    floor = LoopConfig(schedule="progressive", mean=3, min_sampled=3, max_sampled=5)
    expected = {(n + k, k) for n in range(3) for k in range(max(1, 3 - n), 6 - n)}
    assert {floor.draw(0, s) for s in range(2000)} == expected
    assert LoopConfig(schedule="uniform", mean=2, max_sampled=4, backprop=2).draw(0, 1)[1] == 2
    assert LoopConfig(schedule="uniform", mean=2, max_sampled=4).draw(0, 1)[1] is None


def test_warmup_runs_one_loop_then_the_schedule():
    cfg = LoopConfig(schedule="fixed", mean=5, max_sampled=8, warmup_steps=3)
    assert [cfg.draw(0, s) for s in range(5)] == [(1, None)] * 3 + [(5, None)] * 2
    assert [cfg.sample(0, s) for s in range(5)] == [1, 1, 1, 5, 5]


@pytest.mark.parametrize("bad, match", [
    ({"schedule": "progressive", "backprop": 2}, "backprop must be 0"),
    ({"warmup_steps": -1}, "warmup_steps"),
])
def test_loop_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        LoopConfig(**bad)


def test_task_data_config_errors():
    with pytest.raises(ValueError, match="data.task names"):
        DataConfig(source="task")
    with pytest.raises(ValueError, match="data.task names"):
        DataConfig(task="khop")
    with pytest.raises(ValueError, match="data.task must be one of"):
        DataConfig(source="task", task="nope")
    with pytest.raises(ValueError, match="task_args"):
        DataConfig(source="task", task="khop", task_args=3)
    with pytest.raises(ValueError, match="step_graph"):
        load_config("shakespeare-tiny", overrides=["step_graph=true", "optim.muon_impl='batched'",
                                                   "loops.schedule='progressive'", "loops.backprop=0"])


@pytest.mark.parametrize("name", ["khop", "prefix_sums"])
def test_build_task_names_an_unknown_argument(name):
    """A misspelt ``data.task_args`` key is a ValueError naming it (it was a TypeError traceback from the
    task's constructor), for ``mythos train`` and the experiments alike."""
    with pytest.raises(ValueError, match=r"unknown data.task_args for task .*: statments \(known: .*\)"):
        build_task(name, {"statments": 20})
    with pytest.raises(ValueError, match="data.task_args must be a table"):
        build_task(name, 3)


@pytest.mark.parametrize("name, args, field", [("khop", {"statements": "16"}, "statements"),
                                               ("prefix_sums", {"bits": "six"}, "bits"),
                                               ("prefix_sums", {"bits": 6.5}, "bits"),
                                               ("prefix_sums", {"depth_curriculum": "yes"}, "depth_curriculum"),
                                               ("phop", {"alphabet": True}, "alphabet")])
def test_build_task_names_an_argument_of_the_wrong_type(name, args, field):
    """A task argument of the wrong type is a ValueError naming it (prefix sums' bits='six' was a TypeError
    traceback, and depth_curriculum='yes' was taken as true)."""
    with pytest.raises(ValueError, match=rf"^data\.task_args\.{field} must be of type"):  # the name a user writes
        build_task(name, args)


def test_task_loader_is_resume_exact_split_by_rank_and_told_each_steps_loops():
    task = build_task("prefix_sums", {"bits": 8, "depth_curriculum": True})
    seen = []
    loader = TaskLoader(task, 6, seed=1, loops_at=lambda step: seen.append(step) or step + 1, grad_accum=2)
    batches = [loader.next_batch() for _ in range(4)]
    assert seen == [0, 0, 1, 1]  # micro-batches of one step share its loop count
    assert all((y[:, 1 if i < 2 else 2:] == -100).all() for i, (_, y) in enumerate(batches))
    resumed = TaskLoader(task, 6, seed=1, loops_at=lambda step: step + 1, grad_accum=2)
    resumed.load_state_dict({"index": 2})
    assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), batches[2]))
    x0, _ = TaskLoader(task, 6, 1, lambda s: None, rank=0, world_size=2).next_batch()
    x1, _ = TaskLoader(task, 6, 1, lambda s: None, rank=1, world_size=2).next_batch()
    full, _ = TaskLoader(task, 6, 1, lambda s: None).next_batch()
    assert torch.equal(torch.stack([x0, x1], 1).flatten(0, 1), full)  # rank r gets rows r, r + world, ...
    with pytest.raises(ValueError, match="divisible"):
        TaskLoader(task, 5, 1, lambda s: None, world_size=2)


def _task_overrides(tmp_path, *extra):
    return ["steps=5", "batch_size=8", "log_every=1", "eval_batches=1", "model.dim=32", "model.n_heads=2",
            "model.n_kv_heads=1", "model.n_experts=2", "model.n_experts_per_tok=1", "model.n_shared_experts=1",
            "model.expert_dim=32", "model.max_seq_len=16",
            "model.vocab_size=2", "model.attn_type='gqa'", "model.lora_rank=0", "model.prelude_layers=1",
            "model.coda_layers=1", "data.source='task'", "data.task='prefix_sums'", "data.task_args={bits=8}",
            "data.seq_len=8", "loops.schedule='progressive'", "loops.mean=2", "loops.max_sampled=4",
            "loops.warmup_steps=2", "optim.warmup_steps=1", "sweep_loops=[1]", f"out_dir='{tmp_path}'", *extra]


def test_trainer_runs_each_step_with_its_drawn_loops_and_gradient_loops(tmp_path, monkeypatch):
    cfg = load_config(overrides=_task_overrides(tmp_path))
    trainer = Trainer(cfg, progress=False)
    calls = []
    real = trainer.model.forward

    def spy(x, n_loops=None, **kw):
        calls.append((n_loops, kw.get("backprop_loops"), x.shape))
        return real(x, n_loops, **kw)

    monkeypatch.setattr(trainer.model, "forward", spy)
    for _ in range(cfg.steps):
        trainer.train_step()
        trainer.step += 1
    assert [c[:2] for c in calls] == [cfg.loops.draw(cfg.seed, s) for s in range(cfg.steps)]
    assert calls[0][:2] == (1, None) and all(shape == (8, 8) for *_, shape in calls)


def test_trainer_rejects_a_task_that_does_not_fit_the_model(tmp_path):
    with pytest.raises(ValueError, match="data.seq_len"):
        Trainer(load_config(overrides=_task_overrides(tmp_path, "data.seq_len=7")), progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(load_config(overrides=_task_overrides(tmp_path, "model.vocab_size=1")), progress=False)
