"""Experiments: the k-hop task is what it claims; the fit recovers known curves; each experiment's CPU
preset runs end to end through the CLI (pipeline check, not the result)."""

import json
import math
import random

import pytest
import torch

from open_mythos.cli import main
from open_mythos.config import MythosConfig
from open_mythos.experiments.baselines import DenseTransformer, matched_dense_layers
from open_mythos.experiments.khop import EQ, QUERY, SEMI, KHopTask
from open_mythos.experiments.scaling import fit_saturating_exponential


def solve(task: KHopTask, row: list[int]) -> tuple[int, int]:
    """Independent solver: parse the statements, follow the queried variable to a value; (answer, hops)."""
    body, query = row[:-3], row[-3:]
    assert query[0] == QUERY and query[2] == EQ
    rhs = {}
    for i in range(0, len(body), 4):
        lhs, eq, src, semi = body[i: i + 4]
        assert eq == EQ and semi == SEMI and lhs not in rhs  # every variable is assigned exactly once
        rhs[lhs] = src
    node, hops = query[1], 0
    while node in rhs:
        node, hops = rhs[node], hops + 1
    assert 4 <= node < 4 + task.n_values
    return node, hops


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_khop_problems_have_exactly_k_hops_and_the_right_answer(k):
    task = KHopTask()
    x, y = task.sample([k] * 32, random.Random(k))
    assert x.shape == (32, task.seq_len) and int(x.max()) < task.vocab_size
    for row, answer in zip(x.tolist(), y.tolist()):
        assert solve(task, row) == (answer, k)


def test_khop_bad_settings():
    with pytest.raises(ValueError, match="hops must be"):
        KHopTask().sample([11], random.Random(0))
    with pytest.raises(ValueError, match="n_vars"):
        KHopTask(n_vars=10, statements=20)


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
