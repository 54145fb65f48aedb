"""Experiments: the k-hop and prefix-sum tasks are what they claim (checked by independent solvers);
the fit recovers known curves; each experiment's CPU preset runs end to end through the CLI (pipeline
check, not the result)."""

import contextlib
import importlib
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from open_mythos import OpenMythos
from open_mythos.cli import main
from open_mythos.config import MythosConfig
from open_mythos.eval.perplexity import logits_by_loop
from open_mythos.experiments.baselines import DenseTransformer, matched_dense_layers
from open_mythos.experiments import extrapolation
from open_mythos.experiments.extrapolation import converged_accuracy
from open_mythos.experiments.khop import IGNORE, N_SPECIAL, QUERY, SEMI, KHopTask
from open_mythos.experiments.prefix_sums import PrefixSumTask
from open_mythos.experiments.scaling import fit_saturating_exponential
from open_mythos.training.tasks import build_task

from conftest import tiny_config


def solve(task: KHopTask, row: list[int]) -> tuple[dict[int, int], list[tuple[int, int, int]], dict[int, int]]:
    """Independent solver: run the program in order. Returns the resolved value of every variable,
    per query (variable, value, hops), and every variable's hops. Asserts the program is well formed:
    statements `var src ;`, every variable assigned once, every variable used only after its assignment."""
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
    return value, out, hops


@pytest.mark.parametrize("k", [1, 2, 5, 10])
@pytest.mark.parametrize("queries", [1, 4])
def test_khop_problems_have_exactly_k_hops_and_the_right_targets(k, queries):
    task = KHopTask(queries=queries)
    x, y = task.sample([k] * 32, random.Random(k))
    assert x.shape == y.shape == (32, task.seq_len) and int(x.max()) < task.vocab_size
    for row, target in zip(x.tolist(), y.tolist()):
        value, asked, _ = solve(task, row)
        assert asked[-1][1:] == (target[-1], k)  # the scored query: the k-hop chain's end
        assert len({var for var, _, _ in asked}) == queries and max(h for _, _, h in asked) == k
        expected = [IGNORE] * task.seq_len
        for i in range(0, 3 * task.statements, 3):  # every statement's value at its src slot
            expected[i + 1] = value[row[i]]
        for j, (_, v, _) in enumerate(asked):
            expected[3 * task.statements + 2 * j + 1] = v
        assert target == expected


def test_khop_depths_and_the_depth_curriculum_follow_the_solver():
    task = KHopTask(statements=12, max_hops=10, n_vars=16, queries=4, train_max_hops=5, depth_slack=1)
    x, y, depth = task.sample_with_depths([3, 7, 10, 1], random.Random(0))
    for row, d in zip(x.tolist(), depth.tolist()):
        _, _, hops = solve(task, row)
        body = 3 * task.statements
        assert d[1:body:3] == [hops[row[i]] for i in range(0, body, 3)]  # each statement's src slot
        assert d[body + 1::2] == [hops[v] for v in row[body + 1::2]]     # each query
    assert ((depth > 0) == (y != IGNORE)).all()
    for n_loops in (1, 2):  # the curriculum masks targets, never changes the problems
        (xb, yb), (xf, yf) = task.batch(64, random.Random(5), n_loops), task.batch(64, random.Random(5), None)
        kept = yb != IGNORE
        assert torch.equal(xb, xf) and torch.equal(yb[kept], yf[kept]) and int(kept.sum()) < int((yf != IGNORE).sum())
    hops = [max(solve(task, row)[2].values()) for row in task.batch(200, random.Random(1), None)[0].tolist()]
    assert set(hops) == {1, 2, 3, 4, 5}  # training problems: k uniform in 1..train_max_hops


def test_khop_curriculum_supervises_exactly_the_depths_n_loops_can_reach():
    task = KHopTask(statements=12, max_hops=10, n_vars=16, queries=4, train_max_hops=5, depth_slack=2)
    for n_loops in (1, 3):
        x, y = task.batch(32, random.Random(n_loops), n_loops)
        for row, target in zip(x.tolist(), y.tolist()):
            _, _, hops = solve(task, row)
            body = 3 * task.statements
            for i in range(0, body, 3):
                assert (target[i + 1] != IGNORE) == (hops[row[i]] <= n_loops + 2)
            for j, v in enumerate(row[body + 1::2]):
                assert (target[body + 1 + 2 * j] != IGNORE) == (hops[v] <= n_loops + 2)


def test_khop_guess_is_one_over_the_values_present_when_the_answer_is_present():
    task = KHopTask(statements=12, max_hops=10, n_vars=16, queries=2)
    x, y = task.eval_batch(4, 64, random.Random(2))
    guess = task.guess(x, y)
    for row, answer, g in zip(x.tolist(), y[:, -1].tolist(), guess.tolist()):
        values = {t for t in row if N_SPECIAL <= t < N_SPECIAL + task.n_values}
        assert g == pytest.approx((answer in values) / len(values))
    pred = y.clone()
    pred[:3, -1] = 0
    assert task.correct(pred, y).tolist() == [False] * 3 + [True] * 61


def test_prefix_sums_targets_are_the_running_parity_and_scoring_is_all_positions():
    task = PrefixSumTask(bits=12, depth_curriculum=True)
    x, y = task.eval_batch(40, 16, random.Random(0))
    for bits, target in zip(x.tolist(), y.tolist()):
        parity = 0
        for b, t in zip(bits, target):
            parity ^= b
            assert t == parity
    assert task.correct(y, y).all() and not task.correct(1 - y, y).any()
    off_by_one = y.clone()
    off_by_one[:, -1] ^= 1
    assert not task.correct(off_by_one, y).any()
    xb, yb = task.batch(8, random.Random(3), 5)
    assert xb.shape == (8, 12) and (yb[:, 5:] == IGNORE).all() and (yb[:, :5] == xb.cumsum(1)[:, :5] % 2).all()
    assert (PrefixSumTask(bits=12).batch(8, random.Random(3), 5)[1] != IGNORE).all()  # the paper: every position
    assert task.guess(x, y).tolist() == [0.5 ** 40] * 16
    with pytest.raises(ValueError, match="bits"):
        PrefixSumTask(bits=0)


def test_khop_bad_settings():
    with pytest.raises(ValueError, match="hops must be"):
        KHopTask().sample([11], random.Random(0))
    with pytest.raises(ValueError, match="n_vars"):
        KHopTask(n_vars=10, statements=20)
    with pytest.raises(ValueError, match="queries"):
        KHopTask(queries=21)
    with pytest.raises(ValueError, match="train_max_hops"):
        KHopTask(train_max_hops=11)
    with pytest.raises(ValueError, match="depth_slack"):
        KHopTask(depth_slack=-1)


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


def test_loops_and_dense_vs_looped_cpu_presets_end_to_end(tmp_path, capsys):
    assert main(["experiment", "loops", "--out", str(tmp_path / "l"), "--set", "steps=6", "--no-progress"]) == 0
    loops = json.loads((tmp_path / "l" / "loops.json").read_text())
    assert [r["n_loops"] for r in loops["sweep"]] == [1, 2, 3, 4, 5, 8, 12, 16]
    assert {"L_inf", "A", "tau", "r2"} <= set(loops["fit"]) and (tmp_path / "l" / "loops.png").is_file()
    assert main(["experiment", "dense-vs-looped", "--out", str(tmp_path / "d"), "--set", "steps=4",
                 "--no-progress"]) == 0
    result = json.loads((tmp_path / "d" / "dense_vs_looped.json").read_text())
    runs = result["runs"]
    assert [r["looped"] for r in runs] == [True, False, False]
    assert runs[0]["params"] == runs[1]["params"] < runs[2]["params"]  # same model at 1 loop; n - 1 more layers
    assert [r["n_loops"] for r in runs[0]["sweep"]] == [1, 2, 4, 8, 16]
    l_loop, l_param, l_flop = (r["loss"] for r in runs)
    assert result["looped_gain_vs_param_matched"] == pytest.approx((l_param - l_loop) / l_param)
    assert result["looped_gap_closed_vs_flop_matched"] == pytest.approx((l_param - l_loop) / (l_param - l_flop))
    assert (tmp_path / "d" / "dense_vs_looped.png").is_file()
    # the summary line prints the gap closed as a fraction with two decimals, like the gain (was the raw float)
    assert f"gap to FLOP-matched closed {result['looped_gap_closed_vs_flop_matched']:.2f};" in capsys.readouterr().out


def test_dense_variants_unroll_the_loops_into_distinct_layers():
    from open_mythos.experiments.scaling import DENSE_PRESETS, dense_variants
    from open_mythos.training.config import load_config

    for preset in DENSE_PRESETS.values():
        cfg = load_config(preset[0], overrides=preset[1])
        for name, changes in dense_variants(cfg).items():
            dense = load_config(preset[0], overrides=[*preset[1], *changes])
            layers = dense.model.prelude_layers + 1 + dense.model.coda_layers
            loops = cfg.loops.mean if name == "flop_matched" else 1
            assert dense.loops.schedule == "fixed" and dense.loops.mean == 1
            assert layers == cfg.model.prelude_layers + loops + cfg.model.coda_layers


def test_ablation_rows_are_single_named_changes_and_the_runner_reports_each(tmp_path):
    from open_mythos.experiments.ablate import PRESETS, ROWS, row_overrides
    from open_mythos.training.config import load_config

    base = load_config(PRESETS["cpu"][0], overrides=PRESETS["cpu"][1])
    assert row_overrides("baseline", base) == []
    assert row_overrides("residual+state_embed", base) == [*ROWS["residual"](base), *ROWS["state_embed"](base)]
    assert row_overrides("lr_half", base)[0] == f"optim.muon_lr={base.optim.muon_lr / 2}"
    for name in ROWS:  # every row builds a valid config
        load_config(PRESETS["cpu"][0], overrides=[*PRESETS["cpu"][1], *row_overrides(name, base)])
    with pytest.raises(ValueError, match="unknown ablation row"):
        row_overrides("residual+nope", base)
    assert main(["experiment", "ablate", "--rows", "baseline,residual", "--out", str(tmp_path), "--set", "steps=2",
                 "--set", "eval_batches=1", "--no-progress"]) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["row"] for r in result["rows"]] == ["baseline", "residual"]
    assert all(set(r["loss"]) == {"1", "2", "4", "8", "16"} for r in result["rows"])


def test_ablation_rows_are_checked_before_any_row_trains(tmp_path):
    """A misspelt row after a good one is an error before the good one trains (it trained first, then failed)."""
    from open_mythos.experiments.ablate import run_ablation

    with pytest.raises(ValueError, match="unknown ablation row"):
        run_ablation("cpu", tmp_path, ["steps=1"], ["baseline", "residual+nope"])
    assert not (tmp_path / "baseline").exists()


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


@pytest.mark.parametrize("name, stem, keys", [
    ("khop", "khop", {"hop10_accuracy", "dense_hop10_accuracy"}),
    ("prefix-sums", "prefix_sums", {"extrapolation_accuracy", "paper_accuracy", "baseline_extrapolation_accuracy"}),
    ("p-hop", "phop", {"extrapolation_accuracy", "paper_accuracy", "baseline_extrapolation_accuracy",
                       "trained_loops_accuracy", "unrolled_extrapolation_accuracy"}),
])
def test_extrapolation_cpu_presets_end_to_end(tmp_path, name, stem, keys, monkeypatch):
    builds = []
    monkeypatch.setattr(extrapolation, "build_task", lambda *a: builds.append(a) or build_task(*a))
    assert main(["experiment", name, "--out", str(tmp_path), "--set", "steps=4", "--no-progress"]) == 0
    r = json.loads((tmp_path / f"{stem}.json").read_text())
    assert keys | {"overthinking", "rdt_accuracy", "baseline_accuracy", "guess_accuracy"} <= set(r)
    assert r["rdt_params"] == r["baseline_params"]  # the baseline is the same model, run once
    assert set(r["rdt_accuracy"]) == {str(n) for n in r["loops"]}
    grid = [r["rdt_accuracy"][str(n)] for n in r["loops"]]
    assert all(0 <= a <= 1 for row in grid + [r["baseline_accuracy"], r["guess_accuracy"]] for a in row)
    assert r["rdt_best_accuracy"] == [max(col) for col in zip(*grid)]
    assert r["overthinking"]["accuracy"] == grid[-1][-1] and (tmp_path / f"{stem}.png").stat().st_size > 0
    assert r["settings"]["steps"] == 4 and r["settings"]["data"]["source"] == "task"
    assert len(r["rdt_state_rms_by_loop"]) == max(r["loops"]) and all(v > 0 for v in r["rdt_state_rms_by_loop"])
    assert len(builds) == 1  # the experiment builds its task once (split_settings) and evaluates on that one


def test_experiment_settings_are_validated_before_training(tmp_path):
    for bad, match in [("eval.bogus=1", "eval.bogus"), ("bogus=1", "bogus"), ("loops.schedule='nope'", "schedule"),
                       ("data.task='nope'", "data.task"), ("eval.stop_patience=0", "eval.stop_patience"),
                       ("eval.loops=[]", "eval.loops"), ("eval.problems=0", "eval.problems"),
                       ("model.loop_output='act'", "loop_output"), ("data.source='shakespeare'", "data.source")]:
        assert main(["experiment", "khop", "--out", str(tmp_path), "--set", bad]) == 2
        for name in ("khop", "prefix_sums", "phop"):
            module = importlib.import_module(f"open_mythos.experiments.{name}")
            with pytest.raises(ValueError, match=match):
                extrapolation.split_settings(module.PRESETS["cpu"], [bad])
    assert not (tmp_path / "rdt").exists()


def test_eval_sizes_the_task_cannot_make_fail_before_training(tmp_path):
    """k-hop with max_hops=6 cannot make the preset's 7..10-hop test problems: the task's own message, named by
    the eval entry, before the two models train (it used to come after both)."""
    bad = "data.task_args.max_hops=6"
    assert main(["experiment", "khop", "--out", str(tmp_path), "--set", bad]) == 2
    assert not (tmp_path / "rdt").exists()
    from open_mythos.experiments.khop import PRESETS
    with pytest.raises(ValueError, match=r"eval.sizes entry 7: hops must be in \[1, 6\]"):
        extrapolation.split_settings(PRESETS["cpu"], [bad])
    tree, _, ev, _ = extrapolation.split_settings(PRESETS["cpu"], [bad, "eval.sizes=[1, 6]"])
    assert ev["sizes"] == [1, 6]


@pytest.mark.parametrize("name, args, size", [("khop", ["data.task_args.train_max_hops=3"], 3),
                                              ("prefix_sums", ["data.task_args.bits=5"], 5),
                                              ("phop", ["data.task_args.max_hops=2", "eval.sizes=[1, 2]"], 2)])
def test_the_largest_trained_size_follows_the_task_arguments(name, args, size):
    """eval.train_max_size (the plot's 'largest trained' line) is the task's, after --set (it stayed the
    preset's: the p-hop probe had to set it by hand); an explicit eval.train_max_size still wins."""
    module = importlib.import_module(f"open_mythos.experiments.{name}")
    assert extrapolation.split_settings(module.PRESETS["cpu"], args)[2]["train_max_size"] == size
    assert extrapolation.split_settings(module.PRESETS["cpu"], [*args, "eval.train_max_size=1"])[2][
        "train_max_size"] == 1


@pytest.mark.parametrize("bad, match", [("eval=3", r"\[eval\] must be a table"),
                                        ("model=3", r"\[model\] must be a table"),
                                        ("data=3", r"\[data\] must be a table"),
                                        ("eval.sizes=[8, 4]", "eval.sizes must be increasing"),
                                        ("eval.sizes=[4, 4]", "eval.sizes must be increasing")])
def test_settings_that_are_not_tables_or_unordered_sizes_are_named(tmp_path, bad, match):
    """--set eval=3 / model=3 were tracebacks; unordered sizes made 'the largest test size' (extrapolation_accuracy,
    overthinking, the state RMS) the last entry, not the largest."""
    from open_mythos.experiments.prefix_sums import PRESETS
    with pytest.raises(ValueError, match=match):
        extrapolation.split_settings(PRESETS["cpu"], [bad])
    assert main(["experiment", "prefix-sums", "--out", str(tmp_path), "--set", bad]) == 2


def test_the_model_fits_the_longest_evaluated_problem():
    """Prefix sums are trained on short strings and tested on long ones: model.max_seq_len covers the longest."""
    from open_mythos.experiments.prefix_sums import PRESETS
    tree, _, ev, _ = extrapolation.split_settings(PRESETS["cpu"], ["model.max_seq_len=8", "eval.sizes=[4, 100]"])
    assert tree["model"]["max_seq_len"] == 100 and tree["data"]["seq_len"] < 100


def test_task_arguments_set_the_sequence_length_and_vocabulary():
    """A larger k-hop problem (20 statements, 32 variables) needs no other override: the tree that training gets
    has the task's seq_len and a vocabulary that holds its ids, and the task returned beside it is the one the tree
    describes; the preset's own shape is left as it was."""
    from open_mythos.experiments.khop import PRESETS
    tree, _, _, task = extrapolation.split_settings(PRESETS["gpu"], ["data.task_args.statements=20",
                                                                     "data.task_args.n_vars=32"])
    assert task == KHopTask(**tree["data"]["task_args"])
    assert (task.seq_len, task.vocab_size) == (3 * 20 + 2 * 6, 2 + 8 + 32)
    assert tree["data"]["seq_len"] == tree["model"]["max_seq_len"] == task.seq_len
    assert tree["model"]["vocab_size"] == task.vocab_size
    assert PRESETS["gpu"]["data"]["seq_len"] == KHopTask(**PRESETS["gpu"]["data"]["task_args"]).seq_len == 48


@pytest.mark.parametrize("patience", [1, 2, 50])
def test_converged_stop_equals_a_loop_by_loop_reference(patience):
    """Each problem stops at the first loop whose prediction at every answer position has not changed for
    `patience` loops (or at the last loop); the answer is the prediction there: rerun the full forward at
    every loop count and compare."""
    task = PrefixSumTask(bits=6)
    model = OpenMythos(tiny_config(vocab_size=2, max_seq_len=8, lora_rank=0)).eval()
    trainer = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    max_loops, problems = 6, 40
    acc, mean_loops = converged_accuracy(model, trainer, task, 6, max_loops, patience, problems, batch_size=16)
    rng = random.Random(10_000 + 6)
    correct, loops = 0, 0
    for start in range(0, problems, 16):
        x, y = task.eval_batch(6, min(16, problems - start), rng)
        with torch.no_grad():
            preds = [model(x, n).argmax(-1) for n in range(1, max_loops + 1)]
        for i in range(x.shape[0]):
            stop, run = max_loops, 0
            for t in range(1, max_loops):
                run = run + 1 if torch.equal(preds[t][i], preds[t - 1][i]) else 0
                if run >= patience:
                    stop = t + 1
                    break
            correct += int(torch.equal(preds[stop - 1][i], y[i]))
            loops += stop
    assert acc == correct / problems and mean_loops == pytest.approx(loops / problems)
    if patience == 50:
        assert mean_loops == max_loops


@pytest.mark.parametrize("injection", ["lti", "residual"])
def test_state_rms_by_loop_follows_the_recurrence(injection):
    """The diagnostic's RMS of h_t equals the state walked by hand through the stage API, t = 1..5, and the states
    of logits_by_loop (its former path); it never runs the Coda and LM head."""
    task = PrefixSumTask(bits=6)
    model = OpenMythos(tiny_config(vocab_size=2, max_seq_len=8, lora_rank=0, injection=injection)).eval()
    trainer = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    coda_calls = []
    hook = model.head.register_forward_hook(lambda *_: coda_calls.append(1))
    rms = extrapolation.state_rms_by_loop(model, trainer, task, 6, 5, problems=8)
    hook.remove()
    assert not coda_calls
    x, _ = task.eval_batch(6, 8, random.Random(20_000 + 6))
    with torch.no_grad():
        assert rms == [float(h.float().pow(2).mean().sqrt()) for h, _ in logits_by_loop(model, x, 5)]
    with torch.no_grad():
        rope = model.rope(torch.arange(6))
        e = model.embed_prelude(x, rope)
        h, expected = model.initial_state(e), []
        for t in range(5):
            h = model.iterate(h, e, t, rope)
            expected.append(float(h.pow(2).mean().sqrt()))
    assert rms == pytest.approx(expected, rel=1e-6)


def test_eval_mode_restores_every_modules_own_mode_also_on_an_exception():
    """A model with a submodule kept in eval mode (a frozen part) gets back exactly its modes: eval_mode set every
    module to the top-level mode afterwards, so the frozen part came back in train mode."""
    from open_mythos.eval.perplexity import eval_mode

    model = OpenMythos(tiny_config()).train()
    model.prelude.eval()
    modes = [m.training for m in model.modules()]
    assert True in modes and False in modes
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert [m.training for m in model.modules()] == modes


def test_evaluation_helpers_leave_the_models_mode_as_they_found_it():
    task = PrefixSumTask(bits=6)
    model = OpenMythos(tiny_config(vocab_size=2, max_seq_len=8, lora_rank=0))
    trainer = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    for training in (False, True):
        model.train(training)
        extrapolation.accuracy(model, trainer, task, 6, 2, 8, 8)
        extrapolation.converged_accuracy(model, trainer, task, 6, 3, 1, 8, 8)
        extrapolation.state_rms_by_loop(model, trainer, task, 6, 2, problems=4)
        assert model.training is training


def test_an_experiment_run_again_replaces_its_own_earlier_run(tmp_path):
    """Running an experiment twice into one --out retrains its models (as loops / dense-vs-looped do); it used to
    stop at the second run's first model with 'pass --resume or --overwrite', flags `mythos experiment` has not."""
    from open_mythos.experiments.ablate import run_ablation
    from open_mythos.experiments.phop import PRESETS

    tree, _, _, _ = extrapolation.split_settings(PRESETS["cpu"], ["steps=1", "eval_batches=1", "sweep_loops=[1]"])
    for _ in range(2):
        _, _, summary = extrapolation.train(tree, [], tmp_path / "rdt", progress=False)
        assert summary["steps"] == 1
    for _ in range(2):
        result = run_ablation("cpu", tmp_path / "ablate", ["steps=1", "eval_batches=1"], ["baseline"])
        assert [r["row"] for r in result["rows"]] == ["baseline"]


@pytest.mark.parametrize("name, extra", [("khop", []), ("prefix_sums", ["data.task_args.depth_curriculum=true"])])
def test_the_unrolled_model_is_supervised_on_every_target_like_the_baseline(name, extra):
    """eval.unrolled on a task with a depth curriculum: the unrolled fixed-depth model, run once, must see every
    target as the parameter-matched baseline does (it kept the curriculum, so at its one loop it was supervised
    only on targets of depth <= 1 + depth_slack: a crippled baseline)."""
    import copy

    from open_mythos.training.config import apply_overrides, config_from_dict

    module = importlib.import_module(f"open_mythos.experiments.{name}")
    tree, baseline, _, _ = extrapolation.split_settings(module.PRESETS["cpu"], [*extra, "eval.unrolled=true"])
    assert config_from_dict(copy.deepcopy(tree)).data.task_by_loops  # the RDT trains with the curriculum
    for changes in (baseline, extrapolation.unrolled_overrides(tree)):
        assert not config_from_dict(apply_overrides(copy.deepcopy(tree), changes)).data.task_by_loops


def test_bad_settings_leave_no_output_directory(tmp_path):
    """Settings are checked before the run writes anything: a bad --set to a new --out creates nothing."""
    out = tmp_path / "new"
    assert main(["experiment", "khop", "--out", str(out), "--set", "eval.sizes=[8, 4]"]) == 2
    assert not out.exists()
