"""Inference engine: equality with the model's own decoding, scheduler equality (batched == alone,
depth == static), exit-rule semantics against full forwards, work saved, bad inputs."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from open_mythos import OpenMythos
from open_mythos.inference import Engine, ExitRule, Request
from open_mythos.inference.rows import RowKVCache
from open_mythos.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]


def _model(attn="gqa", **overrides):
    model = OpenMythos(tiny_config(attn, **overrides)).eval()
    torch.nn.init.normal_(model.recurrent.act.proj.weight, std=0.5)  # halting that varies per token
    return model


def _mixed_requests(vocab=97, n=8, seed=1):
    """Ragged prompts, different budgets, greedy and seeded sampling, every exit rule."""
    g = torch.Generator().manual_seed(seed)
    rules = [ExitRule("act"), ExitRule("rel_change", 0.3), ExitRule("kl", 1e-3), ExitRule("none"),
             ExitRule("act", 0.5, min_loops=2)]
    reqs = []
    for i in range(n):
        length = int(torch.randint(1, 12, (1,), generator=g))
        prompt = torch.randint(0, vocab, (length,), generator=g).tolist()
        sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9) if i % 2 else GREEDY
        reqs.append(Request(prompt, int(torch.randint(1, 12, (1,), generator=g)),
                            int(torch.randint(2, 7, (1,), generator=g)), sampling, rules[i % len(rules)],
                            seed=i))
    return reqs


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("policy", ["per_loop", "shared"])
@pytest.mark.parametrize("schedule", ["depth", "token", "static"])
def test_fixed_depth_engine_equals_model_generate(attn, policy, schedule):
    """Without early exit the engine decodes exactly like OpenMythos.generate (itself tested equal
    to the full-sequence forward): ragged prompts in one batch, per-request loop budgets."""
    model = _model(attn)
    for n_loops in (1, 3):
        ref = [model.generate(torch.tensor([p]), 10, n_loops, temperature=0, loop_policy=policy)[0, len(p):].tolist()
               for p in PROMPTS]
        out = Engine(model, max_batch=2, loop_policy=policy, schedule=schedule).run(
            [Request(p, 10, n_loops, GREEDY) for p in PROMPTS])
        assert [c.tokens for c in out] == ref
        assert all(c.depths == [n_loops] * 10 and c.finish_reason == "length" for c in out)
    budgets = [1, 3, 2]  # different budgets in one batch (static: shallower rows wait, frozen)
    ref = [model.generate(torch.tensor([p]), 6, n, temperature=0, loop_policy=policy)[0, len(p):].tolist()
           for p, n in zip(PROMPTS, budgets)]
    out = Engine(model, max_batch=3, loop_policy=policy, schedule=schedule).run(
        [Request(p, 6, n, GREEDY) for p, n in zip(PROMPTS, budgets)])
    assert [c.tokens for c in out] == ref and [c.depths for c in out] == [[n] * 6 for n in budgets]


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_compiled_single_row_engine_equals_model_generate(attn):
    """compile=True at batch 1: every stage is one row, so each Linear runs as a matvec reduction and the
    MoE ranks its top-k and reads the chosen experts in place (layers.matvec, moe.topk_by_rank)."""
    model = _model(attn)
    engine = Engine(model, max_batch=1, schedule="static", compile=True)
    for rule in (ExitRule(), ExitRule("act")):
        for p in PROMPTS[:2]:
            alone = Engine(model, max_batch=1, schedule="static").run([Request(p, 6, 3, GREEDY, rule)])[0]
            out = engine.run([Request(p, 6, 3, GREEDY, rule)])[0]
            assert (out.tokens, out.depths) == (alone.tokens, alone.depths)
            if rule.kind == "none":
                assert out.tokens == model.generate(torch.tensor([p]), 6, 3, temperature=0)[0, len(p):].tolist()


def test_padded_batched_prefill_gives_each_prompts_own_logits_and_cache():
    """The engine prefills ragged prompts as one right-padded batch into arbitrary slots: each row's
    last-token logits (``logits_at``) and cache entries equal those of the prompt's own forward."""
    model = _model()
    rows, n_loops = torch.tensor([2, 0, 1]), 3
    ids = torch.zeros(3, 16, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)] = torch.tensor(p)
    batched = RowKVCache(4, 32, "per_loop", n_loops)
    logits = model(ids, n_loops, batched.bind_prefill(rows), logits_at=torch.tensor([len(p) - 1 for p in PROMPTS]))
    for i, p in enumerate(PROMPTS):
        alone = RowKVCache(1, 32, "per_loop", n_loops)
        ref = model(torch.tensor([p]), n_loops, alone.bind_prefill(torch.tensor([0])))[0, -1]
        torch.testing.assert_close(logits[i], ref, rtol=1e-5, atol=1e-5)
        for key, bufs in alone._buffers.items():
            for name, buf in bufs.items():
                torch.testing.assert_close(batched._buffers[key][name][rows[i], :, : len(p)], buf[0, :, : len(p)])


@pytest.mark.parametrize("compiled", [False, True])
def test_slot_cache_decode_write_fills_forward_and_skips_masked_rows(compiled):
    """One decode write: each writing row's value lands at (row, loop slots ls.., position) and nowhere
    else in the real slots; a row with write=False changes nothing; the read returns each row's keys
    at its loop slot. Compiled as the engine's stages are, too."""
    cache = RowKVCache(5, 8, "per_loop", 4)
    rows, pos, ls = torch.tensor([2, 0, 3, 4]), torch.tensor([5, 1, 7, 0]), torch.tensor([1, 0, 3, 2])
    write = torch.tensor([True, True, False, False])  # row 3 frozen; row 4 is the scratch (padding)
    value = torch.randn(4, 1, 2, 3)

    def step(rows, pos, ls, write, value):
        cache.bind(rows, pos, ls, write)
        return cache.update(("recurrent", 0), k=value)["k"].clone()

    cache.bind(rows, pos, ls, write)
    cache.update(("recurrent", 0), k=torch.zeros(4, 1, 2, 3))  # allocate
    buf = cache._buffers["recurrent"]["k"]
    buf.copy_(torch.randn_like(buf))
    before = buf.clone()
    read = (torch.compile(step) if compiled else step)(rows, pos, ls, write, value)
    expected = before.clone()
    for r, p_, loop_slot, w, v in zip(rows.tolist(), pos.tolist(), ls.tolist(), write.tolist(), value):
        if w:
            expected[r, loop_slot:, p_] = v[0]
    torch.testing.assert_close(buf[:4], expected[:4], rtol=0, atol=0)  # the real slots; 4 is scratch
    torch.testing.assert_close(read, buf[rows, ls], rtol=0, atol=0)


def test_engine_uses_the_models_loop_embedding_scale():
    """The engine builds its own loop-embedding table: it must apply cfg.loop_embed_scale like the model."""
    model = _model(loop_embed_scale=0.05)
    ref = [model.generate(torch.tensor([p]), 8, 3, temperature=0)[0, len(p):].tolist() for p in PROMPTS]
    assert [c.tokens for c in Engine(model, max_batch=3).run([Request(p, 8, 3, GREEDY) for p in PROMPTS])] == ref
    x = torch.tensor([PROMPTS[0]])
    unscaled = OpenMythos(dataclasses.replace(model.cfg, loop_embed_scale=1.0)).eval()
    unscaled.load_state_dict(model.state_dict())
    assert not torch.allclose(model(x, 3), unscaled(x, 3))  # the scale matters, so equality above tests it


@pytest.mark.parametrize("recipe", [dict(injection="residual", state_init="embed"),
                                    dict(state_init="embed", loop_out_norm=False, recurrent_ffn="dense"),
                                    dict(injection="residual", state_norm=True),
                                    dict(injection="parcae", loop_embed="learned", loop_embed_scale=0.5,
                                         sandwich_norm=True)])
def test_engine_follows_the_models_recurrence_recipe(recipe):
    """The engine starts each token's loop at the model's h_0 (RecurrentBlock.initial_state) and steps with its
    injection: greedy decoding equals OpenMythos.generate for non-default recipes too."""
    model = _model(**recipe)
    ref = [model.generate(torch.tensor([p]), 8, 3, temperature=0)[0, len(p):].tolist() for p in PROMPTS]
    for schedule in ("depth", "static"):
        out = Engine(model, max_batch=3, schedule=schedule).run([Request(p, 8, 3, GREEDY) for p in PROMPTS])
        assert [c.tokens for c in out] == ref


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("loop_output", ["final", "act"])
def test_batched_schedules_equal_running_each_request_alone(attn, loop_output):
    model = _model(attn, max_loop_iters=6, loop_output=loop_output)
    reqs = _mixed_requests()
    alone = [Engine(model, max_batch=1, max_loop_budget=6).run([r])[0] for r in reqs]
    assert len({tuple(d) for c in alone for d in [c.depths[1:]] if d}) > 1  # exit depths do vary
    for schedule, sync_every, prefill_batch in (("depth", 1, 1), ("depth", 3, 1), ("depth", 1, 3), ("token", 1, 1),
                                                ("token", 1, 2), ("static", 1, 1)):
        for max_batch in (3, 8):
            out = Engine(model, max_batch=max_batch, max_loop_budget=6, schedule=schedule, sync_every=sync_every,
                         prefill_batch=min(prefill_batch, max_batch)).run(reqs)
            for a, b in zip(alone, out):
                assert (a.tokens, a.depths, a.finish_reason) == (b.tokens, b.depths, b.finish_reason)


@pytest.mark.parametrize("sync_every", [1, 4])
def test_request_arriving_mid_token_changes_nothing(sync_every):
    """Depth schedule: a request that arrives while the running tokens are mid-loop (here one with
    the KL rule, which switches the ticks to the probing variant, and with sync_every 4 a tick that
    runs past the other tokens' exits) must not change how they finish: every request still equals
    running it alone."""
    model = _model(max_loop_iters=6)
    # six tokens loop 6 times; the seventh request's budget of 2 makes its tokens exit first
    early = [Request(p, 4, 6, GREEDY) for p in PROMPTS + [[3, 1], [4, 4, 4]]] + [Request([8], 4, 2, GREEDY)]
    late = Request([5, 6, 7], 4, 6, GREEDY, ExitRule("kl", 1e-3))
    alone = [Engine(model, max_batch=1, max_loop_budget=6).run([r])[0] for r in [*early, late]]
    engine = Engine(model, max_batch=8, max_loop_budget=6, sync_every=sync_every, schedule="depth")
    ids = [engine.submit(r) for r in early]
    events = engine.tick()  # admission + prefill, then the second tokens' first loops
    assert 0 < int(engine.stages.t[0]) < 6  # the fixed-depth tokens are mid-loop
    ids.append(engine.submit(late))
    for _ in range(200):
        if not engine.has_work():
            break
        events += engine.tick()
    for rid, ref in zip(ids, alone):
        mine = [e for e in events if e.request_id == rid]
        assert [e.token for e in mine] == ref.tokens and [e.depth for e in mine] == ref.depths


def test_depth_batching_only_pays_for_the_loops_tokens_run():
    model = _model(max_loop_iters=6)
    reqs = _mixed_requests(n=10, seed=3)
    depth = Engine(model, max_batch=4, max_loop_budget=6, schedule="depth")
    out = depth.run(reqs)
    # the first token of each request comes from the prefill; every other token ran its own depth,
    # besides rows of requests that had ended (see the next test)
    assert depth.stats["loop_rows"] - depth.stats["lag_rows"] == sum(sum(c.depths[1:]) for c in out)
    static = Engine(model, max_batch=4, max_loop_budget=6, schedule="static")
    static.run(reqs)
    assert static.stats["loop_rows"] > depth.stats["loop_rows"]


@pytest.mark.parametrize("sync_every", [1, 3])
def test_depth_ticks_are_pipelined_for_greedy_requests(sync_every):
    """Greedy requests: the device starts each sampled token itself and the host reads a tick's tokens
    only after launching the next one, so each request's row runs exactly one tick past its last
    token; a request that samples on the host is read before the next tick (no lag)."""
    model = _model(max_loop_iters=6)
    reqs = [dataclasses.replace(r, sampling=GREEDY, max_new_tokens=r.max_new_tokens + 1) for r in _mixed_requests()]
    engine = Engine(model, max_batch=3, max_loop_budget=6, sync_every=sync_every, schedule="depth")
    ids = [engine.submit(r) for r in reqs]
    events = engine.tick()
    assert len(engine.unread) == 1  # the first tick is launched, not read
    while engine.has_work():
        events += engine.tick()
    assert engine.stats["lag_rows"] == len(reqs) * sync_every
    for rid, r in zip(ids, reqs):  # and the tokens are those of running each request alone
        ref = Engine(model, max_batch=1, max_loop_budget=6, sync_every=sync_every).run([r])[0]
        assert [e.token for e in events if e.request_id == rid] == ref.tokens
    sampled = Engine(model, max_batch=3, max_loop_budget=6, sync_every=sync_every, schedule="depth")
    sampled.run([dataclasses.replace(r, sampling=SamplingParams(temperature=0.7), seed=1) for r in reqs])
    assert sampled.stats["lag_rows"] == 0


def test_fixed_depth_depth_ticks_start_and_finish_only_when_a_token_starts_or_ends():
    """Exit rule none: the host knows when each token reaches its budget, so although it reads each
    pipelined tick one tick late, only the ticks where a token starts (or ends) run the start (or
    finish) stage."""
    model = _model(max_loop_iters=6)
    engine = Engine(model, max_batch=2, max_loop_budget=6, schedule="depth")
    keys, run = [], engine.run_stage
    engine.run_stage = lambda stage, key, *inputs: keys.append(key) or run(stage, key, *inputs)
    n = 5
    engine.run([Request([1, 2, 3], n, 4, GREEDY)])
    ticks = [k for k in keys if k[0] == "depth"]  # ("depth", rows, probe, start, finish)
    assert len(ticks) == 4 * (n - 1) + 1  # 4 loops for each decoded token, then one lag tick
    assert sum(k[3] for k in ticks) == n  # a start per decoded token, and the lag tick's
    assert sum(k[4] for k in ticks) == n - 1


def test_prefill_batch_prefills_ahead_onto_standby_rows():
    """prefill_batch=2 (one standby row): waiting requests are prefilled two at a time once two rows
    are free, and a prefilled request waits on standby until a running slot frees, so while
    requests wait every tick runs max_batch rows; a lone waiting request is admitted at once."""
    model = _model()
    engine = Engine(model, max_batch=3, prefill_batch=2, schedule="depth")
    lengths = [2, 6, 9, 4, 4, 3, 5]
    ids = [engine.submit(Request([1 + i, 2], n, 2, GREEDY)) for i, n in enumerate(lengths)]
    admitted_at, prefill_sizes, ticks = {}, [], []
    prefill, tick = engine.prefill, engine.depth_tick
    engine.prefill = lambda slots, n_loops: prefill_sizes.append(len(slots)) or prefill(slots, n_loops)
    engine.depth_tick = lambda events: ticks.append((len(engine.running()), bool(engine.waiting or engine.standby),
                                                      len(engine.active))) or tick(events)
    while engine.has_work():
        before = set(engine.active)
        engine.tick()
        for slot in set(engine.active) - before:
            admitted_at.setdefault(engine.active[slot].request_id, engine.stats["ticks"])
    assert all(running == 3 for running, loaded, _ in ticks if loaded)  # under load no running slot is empty
    assert max(rows for *_, rows in ticks) == 4 and all(running <= 3 for running, *_ in ticks)
    assert prefill_sizes[0] == 3 and all(n == 2 for n in prefill_sizes[1:-1])  # the last one may be alone
    # the first slot frees after its 2 loops (2 ticks), read one tick later (pipelined), refilled at the next
    assert admitted_at[ids[3]] == admitted_at[ids[4]] == 2 + 1 + 1
    late = Engine(model, max_batch=3, prefill_batch=2, schedule="depth")
    late.submit(Request([1, 2], 9, 2, GREEDY))
    late.tick()
    late.submit(Request([3, 4], 2, 2, GREEDY))  # only one waits: it does not wait for a second row
    late.tick()
    assert len(late.running()) == 2 and not late.standby


def test_token_schedule_fills_a_freed_slot_at_the_next_token():
    """static: a new request waits for the whole batch; token: it takes the first freed slot."""
    model = _model()
    reqs = [Request(PROMPTS[0], 2, 2, GREEDY), Request(PROMPTS[1], 8, 2, GREEDY), Request(PROMPTS[2], 8, 2, GREEDY)]
    runs = {}
    for schedule in ("token", "static"):
        engine = Engine(model, max_batch=2, schedule=schedule)
        runs[schedule] = (engine.run(reqs), engine.stats["ticks"])
    assert [c.tokens for c in runs["token"][0]] == [c.tokens for c in runs["static"][0]]
    assert runs["token"][1] < runs["static"][1]  # the third request starts after 2 tokens, not after 8


class _RecordingGraphs:
    """Stands in for StageGraphs on the CPU: runs each stage eagerly and records its graph key."""

    def __init__(self):
        self.keys = set()

    def __call__(self, key, stage, *inputs):
        self.keys.add(key)
        return stage(*inputs)


@pytest.mark.parametrize("schedule", ["depth", "token"])
def test_warmup_covers_every_shape_a_workload_meets_and_changes_no_output(schedule):
    """After warmup() a mixed workload (ragged prompts, any batch size, with and without an exit rule)
    needs no stage shape that warm-up did not already run (so no capture while a client waits)."""
    model = _model()
    reqs = [dataclasses.replace(r, n_loops=None) for r in _mixed_requests(n=10) if r.exit_rule.kind in ("none", "act")]
    fresh = Engine(model, max_batch=3, max_len=40, schedule=schedule).run(reqs)
    engine = Engine(model, max_batch=3, max_len=40, schedule=schedule)
    engine.graphs = _RecordingGraphs()
    assert engine.warmup() == 3 * 3 + 3  # batch buckets 1, 2, 3 x prompt buckets 16, 32, 40; + exit-rule runs
    assert not engine.active and not engine.waiting and engine.stats["tokens"] == 0
    warmed = set(engine.graphs.keys)
    out = engine.run(reqs)
    assert engine.graphs.keys == warmed
    assert [(c.tokens, c.depths) for c in out] == [(c.tokens, c.depths) for c in fresh]


def _logits_at_depths(model, ids, depths):
    return {d: model(torch.tensor([ids]), d)[0, -1].float() for d in depths}


@pytest.mark.parametrize("loop_output", ["final", "act"])
def test_kl_rule_exits_where_successive_distributions_agree(loop_output):
    """The second generated token runs right after a full-budget prefill, so its loop-d output
    distribution equals the full forward with n_loops=d: the exit depth must be the first d >= 2
    with KL(p_d || p_{d-1}) < threshold, and the token the argmax of p_d."""
    model = _model(max_loop_iters=6, loop_output=loop_output)
    prompt, budget = [3, 1, 4, 1, 5, 9, 2, 6], 6
    first = model(torch.tensor([prompt]), budget)[0, -1].argmax().item()
    ref = _logits_at_depths(model, prompt + [first], range(1, budget + 1))
    kls = {d: F.kl_div(F.log_softmax(ref[d - 1], -1), F.log_softmax(ref[d], -1), log_target=True,
                       reduction="sum").item() for d in range(2, budget + 1)}
    ranked = sorted(kls.values())
    tol = (ranked[1] + ranked[2]) / 2  # between two measured values: some depths pass, some do not
    expected = next((d for d in range(2, budget + 1) if kls[d] < tol), budget)
    req = Request(prompt, 2, budget, GREEDY, ExitRule("kl", tol))
    out = Engine(model, max_batch=2, max_loop_budget=6).run([req])[0]
    assert out.tokens[0] == first
    assert out.depths[1] == expected
    assert out.tokens[1] == ref[expected].argmax().item()


def test_act_rule_exits_at_the_models_act_halting_depth():
    model = _model(max_loop_iters=6, loop_output="act")
    prompt = [5, 6, 7, 8, 9]
    first = model(torch.tensor([prompt]), 6)[0, -1].argmax().item()
    logits, act_depth = model(torch.tensor([prompt + [first]]), 6, return_act_depth=True)
    out = Engine(model, max_batch=1, max_loop_budget=6).run([Request(prompt, 2, 6, GREEDY, ExitRule("act"))])[0]
    expected = int(act_depth[0, -1])
    assert out.depths[1] == expected
    # loop_output="act": the loops after halting have zero weight, so the output is the full forward's
    assert out.tokens[1] == logits[0, -1].argmax().item()


def test_min_loops_and_budget_bound_the_exit_depth():
    model = _model(max_loop_iters=6)
    reqs = [Request([1, 2, 3], 8, 5, GREEDY, ExitRule("rel_change", 10.0, min_loops=3)),  # fires at once
            Request([1, 2, 3], 8, 4, GREEDY, ExitRule("rel_change", 1e-9))]               # never fires
    fast, slow = Engine(model, max_batch=2, max_loop_budget=6).run(reqs)
    assert fast.depths[1:] == [3] * 7
    assert slow.depths[1:] == [4] * 7


def test_seeded_sampling_is_reproducible_and_eos_stops():
    model = _model()
    req = Request([1, 2, 3], 20, 2, SamplingParams(temperature=1.0), seed=123)
    a = Engine(model).run([req])[0]
    b = Engine(model, max_batch=3).run([Request([4, 4], 5, 1), req, Request([9], 7, 3)])[1]
    assert a.tokens == b.tokens
    eos = a.tokens[4]
    stopped = Engine(model).run([Request([1, 2, 3], 20, 2, SamplingParams(temperature=1.0), eos_token_ids=(eos,),
                                         seed=123)])[0]
    first = a.tokens.index(eos)
    assert stopped.tokens == a.tokens[: first + 1] and stopped.finish_reason == "stop"


def test_streaming_events_and_cancellation_free_the_slot():
    model = _model()
    engine = Engine(model, max_batch=1, schedule="depth")  # one event per step: the first token's
    long_id = engine.submit(Request([1, 2], 30, 2, GREEDY))
    waiting_id = engine.submit(Request([3, 4], 4, 2, GREEDY))
    first = engine.tick()
    assert [e.request_id for e in first] == [long_id] and first[0].finish_reason is None
    engine.cancel(long_id)
    events = []
    while engine.has_work():
        events += engine.tick()
    assert events[0].request_id == long_id and events[0].finish_reason == "cancelled"
    rest = [e for e in events if e.request_id == waiting_id]
    alone = Engine(model, max_batch=1).run([Request([3, 4], 4, 2, GREEDY)])[0]
    assert [e.token for e in rest] == alone.tokens and rest[-1].finish_reason == "length"


def test_cache_memory_per_token_per_policy():
    per_token = {}
    for attn in ("gqa", "mla"):
        model = _model(attn, max_loop_iters=4)
        for policy in ("per_loop", "shared"):
            engine = Engine(model, max_batch=2, loop_policy=policy, max_loop_budget=4)
            engine.run([Request([1, 2, 3], 2, 4, GREEDY)])
            per_token[attn, policy] = engine.cache.bytes_per_token()
    cfg = tiny_config()
    gqa_site = 2 * cfg.n_kv_heads * cfg.head_dim * 4        # k and v, fp32
    mla_site = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # latent + rope key
    dense = cfg.prelude_layers + cfg.coda_layers
    assert per_token["gqa", "shared"] == (dense + 1) * gqa_site
    assert per_token["gqa", "per_loop"] == (dense + 4) * gqa_site
    assert per_token["mla", "per_loop"] == (dense + 4) * mla_site
    assert per_token["mla", "shared"] == (dense + 1) * mla_site


@pytest.mark.parametrize("request_kwargs, message", [
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[1] * 64), "too long"),
    (dict(prompt=[1] * 40, max_new_tokens=30), "exceeds the context"),
    (dict(prompt=[1], max_new_tokens=33), "max_output_tokens"),
    (dict(prompt=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt=[1, 97], max_new_tokens=2), "out of range"),
    (dict(prompt=[1, -1], max_new_tokens=2), "out of range"),
    (dict(prompt="hello", max_new_tokens=2), "list of token ids"),
    (dict(prompt=[1], max_new_tokens=2, n_loops=4), "n_loops"),
    (dict(prompt=[1], max_new_tokens=2, eos_token_ids=(200,)), "eos_token_ids"),
])
def test_bad_requests_are_rejected_and_leave_the_engine_usable(request_kwargs, message):
    model = _model()
    engine = Engine(model, max_batch=2)
    with pytest.raises(ValueError, match=message):
        engine.submit(Request(**request_kwargs))
    assert not engine.has_work()
    assert engine.run([Request([1, 2], 3, 2, GREEDY)])[0].tokens == \
        Engine(model).run([Request([1, 2], 3, 2, GREEDY)])[0].tokens


def test_bad_engine_and_rule_settings():
    model = _model()
    with pytest.raises(ValueError, match="schedule"):
        Engine(model, schedule="fifo")
    with pytest.raises(ValueError, match="max_len"):
        Engine(model, max_len=1000)
    with pytest.raises(ValueError, match="sync_every"):
        Engine(model, sync_every=0)
    with pytest.raises(ValueError, match="prefill_batch"):
        Engine(model, max_batch=4, prefill_batch=5)
    with pytest.raises(ValueError, match="prefill_batch applies to the depth and continuous"):
        Engine(model, max_batch=4, prefill_batch=2, schedule="static")
    with pytest.raises(ValueError, match="exit rule kind"):
        ExitRule("entropy")
    with pytest.raises(ValueError, match="probability"):
        ExitRule("act", 1.5)
    with pytest.raises(ValueError, match="min_loops"):
        ExitRule("kl", min_loops=0)
