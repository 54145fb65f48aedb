"""Experiments: the k-hop task is what it claims; the fit recovers known curves; each experiment's CPU
preset runs end to end through the CLI (pipeline check, not the result)."""

import dataclasses
import json
import math
import random

import pytest
import torch

from open_mythos.cli import main
from open_mythos.config import MythosConfig
from open_mythos.experiments.baselines import DenseTransformer, matched_dense_layers
from open_mythos.experiments.khop import IGNORE, QUERY, SEMI, KHopTask
from open_mythos.experiments.scaling import fit_saturating_exponential


def solve(task: KHopTask, row: list[int]) -> tuple[dict[int, int], list[tuple[int, int, int]]]:
    """Independent solver: run the program in order. Returns the resolved value of every variable and,
    per query, (variable, value, hops). Asserts the program is well formed: statements `var src ;`,
    every variable assigned once, every variable used only after its assignment."""
    body, queries = row[:3 * task.statements], row[3 * task.statements:]
    value, hops = {}, {}
    for i in range(0, len(body), 3):
        var, src, semi = body[i: i + 3]
        assert semi == SEMI and var not in value and task.var(0) <= var < task.vocab_size
        if src < task.var(0):
            value[var], hops[var] = src, 1
        else:
            assert src in value, "a variable is used before it is assigned"
            value[var], hops[var] = value[src], hops[src] + 1
    out = []
    for i in range(0, len(queries), 2):
        assert queries[i] == QUERY
        out.append((queries[i + 1], value[queries[i + 1]], hops[queries[i + 1]]))
    return value, out


@pytest.mark.parametrize("k", [1, 2, 5, 10])
@pytest.mark.parametrize("queries", [1, 4])
def test_khop_problems_have_exactly_k_hops_and_the_right_targets(k, queries):
    task = KHopTask(queries=queries)
    x, y = task.sample([k] * 32, random.Random(k))
    assert x.shape == y.shape == (32, task.seq_len) and int(x.max()) < task.vocab_size
    for row, target in zip(x.tolist(), y.tolist()):
        value, asked = solve(task, row)
        assert asked[-1][1:] == (target[-1], k)  # the scored query: the k-hop chain's end
        assert len({var for var, _, _ in asked}) == queries and max(h for _, _, h in asked) == k
        expected = [IGNORE] * task.seq_len
        for i in range(0, 3 * task.statements, 3):  # every statement's value at its src slot
            expected[i + 1] = value[row[i]]
        for j, (_, v, _) in enumerate(asked):
            expected[3 * task.statements + 2 * j + 1] = v
        assert target == expected


def test_khop_bad_settings():
    with pytest.raises(ValueError, match="hops must be"):
        KHopTask().sample([11], random.Random(0))
    with pytest.raises(ValueError, match="n_vars"):
        KHopTask(n_vars=10, statements=20)
    with pytest.raises(ValueError, match="queries"):
        KHopTask(queries=21)


def test_khop_settings_overrides():
    from open_mythos.experiments.khop import presets, with_overrides

    base = presets()["cpu"]
    cfg = with_overrides(base, ["task.queries=2", "eval_loops=[1, 3]", "model.dim=16", "lr=0.01", "device=cpu"])
    assert (cfg.task.queries, cfg.eval_loops, cfg.model["dim"], cfg.lr, cfg.device) == (2, [1, 3], 16, 0.01, "cpu")
    assert (base.task.queries, base.model["dim"]) == (4, 32)  # the preset itself is untouched
    for bad in ["task.bogus=1", "model.bogus=1", "bogus=1", "task=3", "other.steps=2"]:
        with pytest.raises(ValueError, match="unknown k-hop setting"):
            with_overrides(base, [bad])
    with pytest.raises(ValueError, match="queries"):  # the task's own checks run on the new values
        with_overrides(base, ["task.queries=99"])


def test_fit_recovers_a_saturating_exponential():
    n = [1, 2, 3, 4, 6, 8, 12, 16]
    loss = [1.2 + 0.5 * math.exp(-(x - 1) / 2.5) for x in n]
    fit = fit_saturating_exponential(n, loss)
    assert fit["L_inf"] == pytest.approx(1.2, abs=5e-3) and fit["tau"] == pytest.approx(2.5, rel=0.03)
    assert fit["r2"] > 0.999


def test_dense_baseline_matches_the_parameter_budget():
    cfg = MythosConfig(vocab_size=100, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=32)
    one = sum(p.numel() for p in DenseTransformer(cfg, 1).parameters())
    per_block = sum(p.numel() for p in DenseTransformer(cfg, 2).parameters()) - one
    layers = matched_dense_layers(cfg, one + 3 * per_block + per_block // 3)
    assert layers == 4
    assert DenseTransformer(cfg, 2)(torch.randint(0, 100, (2, 9))).shape == (2, 9, 100)


def test_khop_cpu_preset_end_to_end(tmp_path):
    assert main(["experiment", "khop", "--out", str(tmp_path), "--set", "steps=4"]) == 0
    result = json.loads((tmp_path / "khop.json").read_text())
    assert set(result["rdt_accuracy"]) == {"1", "2", "4", "8"} and len(result["dense_accuracy"]) == 4
    assert abs(result["rdt_params"] - result["dense_params"]) < result["rdt_params"] * 0.25
    assert (tmp_path / "khop.png").stat().st_size > 0


def test_loops_and_dense_vs_looped_cpu_presets_end_to_end(tmp_path):
    assert main(["experiment", "loops", "--out", str(tmp_path / "l"), "--set", "steps=6", "--no-progress"]) == 0
    loops = json.loads((tmp_path / "l" / "loops.json").read_text())
    assert [r["n_loops"] for r in loops["sweep"]] == [1, 2, 3, 4, 5, 8, 12, 16]
    assert {"L_inf", "A", "tau", "r2"} <= set(loops["fit"]) and (tmp_path / "l" / "loops.png").is_file()
    assert main(["experiment", "dense-vs-looped", "--out", str(tmp_path / "d"), "--set", "steps=4",
                 "--no-progress"]) == 0
    runs = json.loads((tmp_path / "d" / "dense_vs_looped.json").read_text())["runs"]
    assert [r["looped"] for r in runs] == [True, False, False, False]
    assert runs[1]["params"] < runs[2]["params"] < runs[3]["params"]
    assert (tmp_path / "d" / "dense_vs_looped.png").is_file()


class _Recorder(torch.nn.Module):
    """Stands in for a model in khop.train: records (problems, loop count), predicts a learned bias."""

    def __init__(self, vocab: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        self.calls = []

    def forward(self, x, n_loops=None):
        self.calls.append((x.clone(), n_loops))
        return self.bias.expand(*x.shape, -1)

    def update_router_bias(self, rate):
        pass


def test_khop_training_feeds_both_models_the_same_problems_and_warms_up_at_one_loop():
    from open_mythos.experiments.khop import KHopConfig, train

    cfg = KHopConfig(task=KHopTask(statements=12, max_hops=10, n_vars=16, queries=2), train_max_hops=5,
                     loops_mean=4, loops_min=2, warmup_steps=3, steps=8, batch_size=4, device="cpu")
    rdt, dense = _Recorder(cfg.task.vocab_size), _Recorder(cfg.task.vocab_size)
    train(rdt, cfg, loops=True, log=lambda _: None)
    train(dense, cfg, loops=False, log=lambda _: None)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(rdt.calls, dense.calls))
    assert [n for _, n in rdt.calls[:3]] == [1, 1, 1] and all(2 <= n <= 6 for _, n in rdt.calls[3:])
    def src(x):  # every statement's src slot
        return x[:, 1: 3 * cfg.task.statements: 3]

    assert all(bool((src(x) < cfg.task.var(0)).all()) for x, _ in rdt.calls[:3])  # warm-up: 1-hop problems only
    assert any(bool((src(x) >= cfg.task.var(0)).any()) for x, _ in rdt.calls[3:])  # then longer chains


def test_khop_warmup_ends_once_one_hop_answers_are_exact_enough():
    from open_mythos.experiments.khop import KHopConfig, train

    cfg = KHopConfig(task=KHopTask(statements=12, max_hops=10, n_vars=16, queries=2), loops_mean=4, loops_min=2,
                     warmup_steps=1000, warmup_until=0.0, steps=60, batch_size=2, device="cpu")
    rdt = _Recorder(cfg.task.vocab_size)
    assert train(rdt, cfg, loops=True, log=lambda _: None)["warmup_end"] == 50  # first check: step 50
    assert [n for _, n in rdt.calls[:50]] == [1] * 50 and all(n >= 2 for _, n in rdt.calls[50:])
    never = dataclasses.replace(cfg, warmup_until=1.01, warmup_steps=55)
    assert train(_Recorder(cfg.task.vocab_size), never, loops=True, log=lambda _: None)["warmup_end"] == 55
