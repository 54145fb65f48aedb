"""Old spellings users type keep working, with a DeprecationWarning naming the new one."""

import pytest

from open_mythos import OpenMythos
from open_mythos.inference import Engine, Request
from open_mythos.sampling import SamplingParams
from open_mythos.training.config import load_config

from conftest import tiny_config


def test_old_loop_range_config_keys_are_read_as_the_new_ones():
    with pytest.warns(DeprecationWarning, match="loops.max_loops is now loops.max_sampled"):
        cfg = load_config("shakespeare-tiny", overrides=["loops.max_loops=5", "loops.min_loops=2"])
    assert (cfg.loops.min_sampled, cfg.loops.max_sampled) == (2, 5)  # an old override still beats the preset


def test_old_engine_spellings_run_the_same_engine():
    model = OpenMythos(tiny_config()).eval()
    req = [Request([1, 2, 3], 4, 2, SamplingParams(temperature=0))]
    with pytest.warns(DeprecationWarning, match="max_loop_budget"):
        old = Engine(model, max_batch=2, max_loops=4)
    with pytest.warns(DeprecationWarning, match="'continuous'"):
        token = Engine(model, max_batch=2, schedule="token")
    new = Engine(model, max_batch=2, max_loop_budget=4, schedule="continuous")
    assert old.max_loop_budget == old.max_loops == 4 and token.schedule == new.schedule == "continuous"
    assert Engine(model).schedule == "continuous"  # the default, as mythos serve's
    assert old.run(req)[0].tokens == token.run(req)[0].tokens == new.run(req)[0].tokens


def test_cli_accepts_the_old_flag_spellings(monkeypatch):
    from open_mythos import cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_serve", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["serve", "--demo", "--max-loops", "6", "--schedule", "token"]) in (0, None)
    assert seen["max_loop_budget"] == 6 and seen["schedule"] == "token"


def test_engine_step_is_now_tick():
    """``Engine.step`` ran one engine tick, not a training step: the old name still ticks."""
    model = OpenMythos(tiny_config()).eval()
    engines = [Engine(model, max_batch=2) for _ in range(2)]
    for engine in engines:
        engine.submit(Request([1, 2, 3], 3, 2, SamplingParams(temperature=0)))
    new_events, old_events = [], []
    while engines[0].has_work():
        new_events += engines[0].tick()
    while engines[1].has_work():
        with pytest.warns(DeprecationWarning, match=r"Engine.step\(\) is now Engine.tick\(\)"):
            old_events += engines[1].step()
    assert [(e.token, e.depth, e.finish_reason) for e in old_events] == \
        [(e.token, e.depth, e.finish_reason) for e in new_events]


def test_slot_kv_cache_is_now_the_row_kv_cache():
    from open_mythos.inference import slots
    from open_mythos.inference.rows import RowKVCache

    with pytest.warns(DeprecationWarning, match="RowKVCache"):
        SlotKVCache = slots.SlotKVCache
    old = SlotKVCache(n_slots=3, max_len=16, loop_policy="per_loop", max_loop_budget=4)  # the old keywords
    new = RowKVCache(n_rows=3, max_len=16, loop_policy="per_loop", max_loop_budget=4)
    assert isinstance(old, RowKVCache) and old.n_slots == old.n_rows == 3
    assert (old.max_len, old.loop_policy, old.loop_slots) == (new.max_len, new.loop_policy, new.loop_slots)
    with pytest.raises(AttributeError):
        slots.NotAName  # noqa: B018
