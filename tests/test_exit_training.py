"""Exit training (training/exit.py) and the engine-exact held-out exit loss (eval/early_exit.py): per-loop
losses and labels against loop-by-loop references, gradient isolation, the objective moving the exit
where early exit is right, the Trainer phase, and teacher-forced decoding against a full forward."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import import_benchmark, tiny_config
from open_mythos import OpenMythos
from open_mythos.eval.early_exit import exit_loss
from open_mythos.inference import ExitRule
from open_mythos.training.config import load_config
from open_mythos.recurrence import act_depth
from open_mythos.training.exit import (ExitConfig, exit_labels, exit_objective, exit_report, loop_losses, oracle_depth,
                                       train_exit)
from open_mythos.training.loop import Trainer
from test_train import tiny_overrides


def _batch(vocab=97, B=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :3] = -100  # unlabelled positions (e.g. a prompt)
    return x, y


def test_loop_losses_and_labels_equal_a_loop_by_loop_reference():
    model = OpenMythos(tiny_config()).eval()
    x, y = _batch()
    D, margin = 5, 0.02
    losses, states = loop_losses(model, x, y, D)
    with torch.no_grad():
        ref = torch.stack([F.cross_entropy(model(x, d).flatten(0, 1), y.flatten(), ignore_index=-100,
                                           reduction="none").view(y.shape) for d in range(1, D + 1)])
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-5)
    assert states.shape == (D, *x.shape, model.cfg.dim)
    labels = exit_labels(losses, margin)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            L = losses[:, b, i].tolist()
            first = next(d for d in range(D) if L[d] <= min(L[d:]) + margin)  # 0-based oracle depth
            assert labels[:, b, i].tolist() == [float(d >= first) for d in range(D)]
            assert int(oracle_depth(labels)[b, i]) == first + 1
    # the act rule's depth: the first d whose cumulative halting probability reaches the threshold, else D
    p = torch.tensor([[0.2, 0.5], [0.3, 0.1], [0.6, 0.1], [0.1, 0.1]])
    assert act_depth(p, 0.99).tolist() == [3, 4]
    assert act_depth(p, 0.5).tolist() == [2, 1]


def test_exit_objective_gradient_reaches_only_the_halting_unit():
    """Even with every LM parameter trainable, the objective's gradient lands on the halting unit alone;
    train_exit changes nothing else and restores requires_grad and the training mode."""
    model = OpenMythos(tiny_config(dropout=0.0))
    x, y = _batch()
    losses, states = loop_losses(model, x, y, 4)
    exit_objective(model, states, exit_labels(losses, 0.01), (y != -100).float()).backward()
    unit = {id(p) for p in model.recurrent.act.parameters()}
    for name, p in model.named_parameters():
        if id(p) in unit:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    model.zero_grad(set_to_none=True)
    model.recurrent.block.requires_grad_(False)  # a frozen part stays frozen afterwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train_exit(model, iter([(x, y)] * 3), ExitConfig(steps=3), 4)
    assert len(history) == 3 and model.training
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"recurrent.act.proj.weight", "recurrent.act.proj.bias"}
    assert all(not p.requires_grad for p in model.recurrent.block.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("recurrent.block."))


def test_trained_exit_leaves_early_where_more_loops_do_not_help():
    """A toy where early exit is clearly right: the block's output projections are zero, so every loop
    returns the same state and loss. The untrained unit (p = sigmoid(-1) = 0.27) exits after 4 loops;
    trained, the act rule exits after 1 (threshold 0.9) or 2 (the default 0.99: a BCE-trained probability
    approaches 1 slowly, so the cumulative sum crosses 0.99 one loop later) at no loss."""
    model = OpenMythos(tiny_config(injection="residual", lora_rank=0))
    with torch.no_grad():
        for name, p in model.recurrent.block.named_parameters():
            if name.endswith(("wo.weight", "w2.weight", "ffn.w2")):
                p.zero_()
    x, y = _batch(B=4, T=16)
    before = exit_report(model, [(x, y)], 6, 0.0, model.act_threshold)
    assert before["oracle_depth"] == 1 and before["act_depth"] == 4
    train_exit(model, iter([(x, y)] * 60), ExitConfig(steps=60, lr=0.1), 6)
    after = exit_report(model, [(x, y)], 6, 0.0, model.act_threshold)
    assert after["act_depth"] <= 2 and after["objective"] < 0.1 * before["objective"]
    assert after["act_loss"] == pytest.approx(after["full_loss"], abs=1e-5)
    assert exit_report(model, [(x, y)], 6, 0.0, 0.9)["act_depth"] == 1


def test_exit_report_runs_the_halting_unit_once_per_batch_and_equals_the_separate_computations():
    """exit_report reads p_d and the objective from one halting-unit pass per batch; its act depth, act loss and
    objective equal act_depth(halting_prob(states)) and exit_objective(states) computed separately."""
    model = OpenMythos(tiny_config()).eval()
    torch.nn.init.normal_(model.recurrent.act.proj.weight, std=0.5)
    batches = [_batch(seed=0), _batch(seed=1, T=9)]
    calls = []
    model.recurrent.act.proj.register_forward_hook(lambda *_: calls.append(1))
    report = exit_report(model, batches, 4, 0.01, 0.9)
    assert len(calls) == len(batches)
    sums, count = {"act_depth": 0.0, "act_loss": 0.0, "objective": 0.0}, 0
    for x, y in batches:
        losses, states = loop_losses(model, x, y, 4)
        mask = (y != -100).float()
        with torch.no_grad():
            depth = act_depth(model.halting_prob(states), 0.9)
            objective = float(exit_objective(model, states, exit_labels(losses, 0.01), mask))
        sums["act_depth"] += float((depth * mask).sum())
        sums["act_loss"] += float((losses.gather(0, depth[None] - 1)[0] * mask).sum())
        sums["objective"] += objective * int(mask.sum())
        count += int(mask.sum())
    for key, total in sums.items():
        assert report[key] == pytest.approx(total / count, rel=1e-6), key
    assert report["tokens"] == count


def test_trainer_exit_phase(tmp_path):
    cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(tmp_path, "exit.steps=4", "exit.loops=3"))
    summary = Trainer(cfg, progress=False).train()
    assert summary["exit_steps"] == 4 and summary["exit_loops"] == 3
    assert summary["exit_objective"] < summary["exit_objective_before"]
    assert 1 <= summary["exit_act_depth"] <= 3 and 1 <= summary["exit_oracle_depth"] <= 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("exit_act_loss" in r for r in records)
    exported = OpenMythos.from_pretrained(tmp_path / "run" / "model")
    assert exported.recurrent.act.proj.weight.abs().sum() > 0  # initialised at zero; trained by the phase
    with pytest.raises(ValueError, match="exit.steps"):
        load_config("shakespeare-tiny", overrides=["exit.steps=2", "model.loop_output=act"])
    for bad, field in (("exit.steps=-1", "exit.steps"), ("exit.margin=-0.1", "exit.margin"), ("exit.lr=0", "exit.lr"),
                       ("exit.loops=true", "exit.loops")):
        with pytest.raises(ValueError, match=field):
            load_config("shakespeare-tiny", overrides=[bad])


def test_trained_exit_benchmark_end_to_end(tmp_path, monkeypatch):
    """benchmarks/trained_exit.py on a tiny run: trains the exit, measures every rule and both schedules,
    writes the JSON and the histogram plot; the full-depth row is the baseline of every other."""
    cfg = load_config("shakespeare-tiny", overrides=tiny_overrides(tmp_path, "steps=2"))
    Trainer(cfg, progress=False).train()
    bench = import_benchmark("trained_exit", monkeypatch)
    out = tmp_path / "bench"
    monkeypatch.setattr("sys.argv", ["trained_exit.py", "--run", str(tmp_path / "run"), "--train-exit-steps", "2",
                                     "--budget", "3", "--eval-rows", "2", "--eval-len", "8", "--prompt-len", "3",
                                     "--requests", "3", "--max-batch", "2", "--prompt-tokens", "4",
                                     "--new-tokens", "3", "--out", str(out)])
    bench.main()
    report = json.loads((out / "trained_exit.json").read_text())
    assert (out / "exit_depths.png").is_file()
    held = report["held_out"]
    assert held["none"]["mean_loops"] == 3 and held["none"]["loss_vs_full_depth"] == 0
    assert {"act_0.5", "act_0.9", "act_0.99", "kl_0.0005", "none_2_loops"} <= set(held)
    assert "act_0.99" in report["held_out_unit_as_loaded"]
    assert report["exit_training"]["steps"] == 2
    for runs in report["throughput"].values():
        assert set(runs) == {"static", "depth_sync_every_1_prefill_batch_1"}
        assert runs["static"]["tokens"] == 9 and runs["static"]["speedup_vs_static"] == 1
    assert set(report["depth_batching_speedup_trained"]) == set(report["throughput"])


@pytest.mark.parametrize("policy", ["per_loop", "shared"])
def test_exit_loss_without_exit_equals_the_full_forward(policy):
    """Teacher-forced decoding with rule "none" scores each token exactly as a full forward at the budget
    (per_loop cache: exact); the histogram counts every scored token at the budget."""
    model = OpenMythos(tiny_config()).eval()
    ids = _batch(B=3, T=14)[0]
    out = exit_loss(model, ids, 5, 3, ExitRule("none"), policy)
    with torch.no_grad():
        logits = model(ids, 3)
    ref = F.cross_entropy(logits[:, 5:-1].flatten(0, 1), ids[:, 6:].flatten())
    if policy == "per_loop":
        assert out["loss"] == pytest.approx(float(ref), abs=1e-5)
    assert out["histogram"] == {3: 3 * 8} and out["mean_loops"] == 3 and out["tokens"] == 24
    with pytest.raises(ValueError, match="prompt_len"):
        exit_loss(model, ids, 13, 3, ExitRule("none"))
    with pytest.raises(ValueError, match=r"ids must be windows of token ids \(B, T\), got shape \(14,\)"):
        exit_loss(model, ids[0], 5, 3, ExitRule("none"))


def test_exit_loss_act_depth_of_the_first_token_is_the_models_act_depth():
    """The first teacher-forced token sees the prompt at full depth and itself at its own depths, so its
    exit depth under ``act`` is the model's ACT halting depth at that position in a full forward."""
    model = OpenMythos(tiny_config()).eval()
    torch.nn.init.normal_(model.recurrent.act.proj.weight, std=0.5)
    ids = _batch(B=6, T=8)[0]
    out = exit_loss(model, ids, 6, 5, ExitRule("act", 0.9))
    model.recurrent.act.threshold = 0.9
    with torch.no_grad():
        _, depth = model(ids[:, :7], 5, return_act_depth=True)
    expected = torch.bincount(depth[:, 6].long(), minlength=6)
    assert out["histogram"] == {d: int(c) for d, c in enumerate(expected.tolist()) if c}


def test_exit_objective_keeps_a_gradient_when_the_unit_saturates():
    """A confident wrong halting unit (logit 20, label 0) must still be pushed back: BCE from the logit gives
    loss ~20 and gradient ~1, where BCE on the rounded probability (p = 1.0 in fp32) gives 100 and 0."""
    model = OpenMythos(tiny_config())
    torch.nn.init.constant_(model.recurrent.act.proj.bias, 20.0)
    states = torch.randn(2, 1, 5, model.cfg.dim)
    labels, mask = torch.zeros(2, 1, 5), torch.ones(1, 5)
    loss = exit_objective(model, states, labels, mask)
    loss.backward()
    assert loss.item() == pytest.approx(20.0, abs=1e-3)
    assert model.recurrent.act.proj.bias.grad.item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_act_depth_of_the_per_loop_states_is_the_models_act_depth(threshold):
    """exit_report's ``act`` depth (act_depth of halting_prob over loop_losses' states) is the depth at which the
    model's own ACT halts each position in a full forward (``return_act_depth``): the training view and the model
    apply one rule."""
    model = OpenMythos(tiny_config()).eval()
    torch.nn.init.normal_(model.recurrent.act.proj.weight, std=0.5)
    model.recurrent.act.threshold = threshold
    x, y = _batch(B=3, T=10)
    _, states = loop_losses(model, x, y, 5)
    with torch.no_grad():
        _, depth = model(x, 5, return_act_depth=True)
    assert torch.equal(act_depth(model.halting_prob(states), threshold).long(), depth.long())
