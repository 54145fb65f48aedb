"""p-hop induction: every generated target is re-derived by a slow solver that reads the definition literally;
the format, scoring, guessing baseline and bad settings; the unrolled baseline's shape."""

import copy
import random

import pytest
import torch

from open_mythos.experiments import extrapolation
from open_mythos.experiments.phop import PRESETS, PHopTask
from open_mythos.loss import IGNORE
from open_mythos.training.config import apply_overrides, config_from_dict


def slow_hop(x: list[int], t: int, p: int) -> int | None:
    """hop_p at position t by scanning: p times, look left of the current position for the same letter and step to
    the position after it (Sanford et al. 2024's find); None when some look finds nothing."""
    pos = t
    for _ in range(p):
        earlier = [i for i in range(pos) if x[i] == x[pos]]
        if not earlier:
            return None
        pos = earlier[-1] + 1
    return x[pos]


@pytest.mark.parametrize("alphabet, length, p", [(2, 10, 3), (3, 24, 1), (4, 40, 5), (4, 64, 12)])
def test_every_target_is_the_slow_solvers_hop(alphabet, length, p):
    task = PHopTask(alphabet=alphabet, length=length, max_hops=12 if p > 8 else 8)
    x, y = task.eval_batch(p, 24, random.Random(p))
    assert x.shape == y.shape == (24, length + 1) and int(x.max()) < task.vocab_size
    for row, target in zip(x.tolist(), y.tolist()):
        assert row[0] == task.hop_token(p) == alphabet + p and target[0] == IGNORE
        chars = row[1:]
        assert all(0 <= c < alphabet for c in chars) and all(a != b for a, b in zip(chars, chars[1:]))
        expected = [slow_hop(chars, t, p) for t in range(length)]
        assert target[1:] == [task.none if e is None else e for e in expected]
        assert expected[-1] is not None  # the scored answer always exists


def test_mixed_hop_rows_and_training_draws():
    task = PHopTask(alphabet=4, length=48, max_hops=8)
    x, y = task.sample([1, 8, 3, 3, 7], random.Random(0))
    for row, target, p in zip(x.tolist(), y.tolist(), [1, 8, 3, 3, 7]):
        assert row[0] == task.hop_token(p)
        assert target[1:] == [task.none if (h := slow_hop(row[1:], t, p)) is None else h for t in range(48)]
    task = PHopTask(alphabet=4, length=48, max_hops=5, train_min_hops=2)
    xb, yb = task.batch(200, random.Random(3), n_loops=2)
    assert {int(t) - task.alphabet for t in xb[:, 0]} == {2, 3, 4, 5}  # p uniform in train_min_hops..max_hops
    xs, ys = task.batch(200, random.Random(3), None)  # n_loops does not change anything: no depth curriculum
    assert torch.equal(xb, xs) and torch.equal(yb, ys)
    assert not torch.equal(xb, task.batch(200, random.Random(4), None)[0])


def test_scoring_is_the_last_answer_and_guessing_is_one_over_the_alphabet():
    task = PHopTask(alphabet=4, length=32, max_hops=4)
    x, y = task.eval_batch(4, 16, random.Random(1))
    pred = y.clone()
    pred[:, 1:-1] = 0  # other positions do not count
    pred[:5, -1] = (y[:5, -1] + 1) % 4
    assert task.correct(pred, y).tolist() == [False] * 5 + [True] * 11
    assert task.guess(x, y).tolist() == [0.25] * 16


def test_bad_settings():
    for kwargs, match in [(dict(alphabet=1), "alphabet"), (dict(max_hops=0), "max_hops"),
                          (dict(length=9, max_hops=8), "length"), (dict(train_min_hops=0), "train_min_hops"),
                          (dict(train_min_hops=17), "train_min_hops"), (dict(alphabet=4.0), "alphabet")]:
        with pytest.raises((ValueError, TypeError), match=match):
            PHopTask(**kwargs)
    with pytest.raises(ValueError, match="hops must be"):
        PHopTask(max_hops=4, length=32).sample([5], random.Random(0))
    with pytest.raises(ValueError, match="too short"):  # 16 hops in 18 letters: almost never an answer
        PHopTask(alphabet=4, length=18, max_hops=16).eval_batch(16, 8, random.Random(0))
    with pytest.raises(ValueError, match="eval.unrolled"):
        extrapolation.split_settings(PRESETS["cpu"], ["eval.unrolled=1"])


def test_the_unrolled_baseline_is_the_loop_as_distinct_layers_run_once():
    tree, baseline, ev, _ = extrapolation.split_settings(PRESETS["gpu"], [])
    assert ev["unrolled"] and tree["model"]["prelude_layers"] == tree["model"]["coda_layers"] == 0
    changes = extrapolation.unrolled_overrides(tree)
    cfg = config_from_dict(apply_overrides(copy.deepcopy(tree), changes))
    assert cfg.loops.schedule == "fixed" and cfg.loops.mean == 1
    assert cfg.model.prelude_layers + 1 + cfg.model.coda_layers == tree["loops"]["mean"] == 6


def test_report_keys_of_a_result_without_the_baseline_and_its_plot(tmp_path):
    """A result rebuilt from an interrupted run's log (benchmarks/results/h200/experiments/phop/from_log.py) may lack
    the one-pass model's row: the report keys the looped model gives are still set, and the plot is drawn."""
    from open_mythos.experiments import extrapolation, phop
    tree, _, ev, _ = extrapolation.split_settings(phop.PRESETS["cpu"], [])
    sizes, loops = ev["sizes"], ev["loops"]
    grid = {str(n): [0.5 + 0.1 * i for i, _ in enumerate(sizes)] for n in loops}
    result = {"settings": tree, "eval": ev, "sizes": sizes, "loops": loops, "rdt_accuracy": grid,
              "rdt_best_accuracy": grid[str(loops[-1])], "guess_accuracy": [0.25] * len(sizes)}
    phop.add_report_keys(result)
    assert "baseline_extrapolation_accuracy" not in result
    assert result["extrapolation_accuracy"] == grid[str(loops[-1])][-1]
    assert result["paper_accuracy"] == phop.PAPER_ACCURACY
    assert extrapolation.plot(result, tmp_path / "p.png", "hops p").stat().st_size > 0
