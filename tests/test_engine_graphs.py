"""The engine's CUDA-graph bookkeeping, on a CPU: graphs are emulated with the semantics of a real capture
(capturing runs nothing and leaves no trace; a replay reruns the recorded stage on the static inputs and
overwrites the static outputs), so that many engines, batch sizes and prompt lengths in one process run
through the same first-eager / then-capture / then-replay path as on a GPU."""

import gc
import weakref

import pytest
import torch

from open_mythos import OpenMythos
from open_mythos.inference import Engine, ExitRule, Request
from open_mythos.inference.graphs import StageGraphs, scoped_compile
from open_mythos.sampling import SamplingParams

from conftest import tiny_config

GREEDY = SamplingParams(temperature=0)


def _tensors(stages) -> list[torch.Tensor]:
    own = [v for v in vars(stages).values() if isinstance(v, torch.Tensor)]
    return own + [t for site in stages.cache._buffers.values() for t in site.values()]


def _copy_into(static, new) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, (tuple, list)):
        for s, n in zip(static, new):
            _copy_into(s, n)


class _EmulatedGraph:
    def __init__(self, stage, inputs, outputs):
        self.stage, self.inputs, self.outputs = stage, inputs, outputs

    def replay(self) -> None:
        _copy_into(self.outputs, self.stage(*self.inputs))


def emulated_capture(stages, log: list):
    """A StageGraphs capture function for an engine's ``stages`` that behaves as a CUDA-graph capture does."""

    def capture(stage, static_inputs):
        assert not gc.isenabled(), "a capture must run with the garbage collector paused"
        sites = {k: set(v) for k, v in stages.cache._buffers.items()}
        before = [t.clone() for t in _tensors(stages)]
        outputs = stage(*static_inputs)
        # nothing may be allocated lazily during a capture: every cache buffer existed after the eager run
        assert {k: set(v) for k, v in stages.cache._buffers.items()} == sites, "cache buffer allocated in capture"
        for t, saved in zip(_tensors(stages), before):  # capturing launches nothing: undo the work
            t.copy_(saved)
        log.append(len(static_inputs))
        return _EmulatedGraph(stage, static_inputs, outputs), outputs

    return capture


def _requests(lengths, n_loops=3, rule=ExitRule()):
    g = torch.Generator().manual_seed(sum(lengths))
    return [Request(torch.randint(0, 97, (n,), generator=g).tolist(), 5, n_loops, GREEDY, rule) for n in lengths]


@pytest.mark.parametrize("schedule", ["static", "depth"])
def test_several_batch_sizes_and_prompt_lengths_in_one_process(schedule):
    """Engines of batch 1 and 4 one after the other in one process (the H200 run that failed captured the
    batch-16 prefill after a batch-1 engine), prompts in three length buckets, with and without an exit rule:
    every stage shape is run eagerly, captured, replayed, and the tokens equal those of an eager engine."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(max_seq_len=96)).eval()
    torch.nn.init.normal_(model.recurrent.act.proj.weight, std=0.5)
    for max_batch in (1, 4):
        for lengths, rule in (([3] * max_batch, ExitRule()), ([20, 3, 40, 9][:max_batch], ExitRule("act"))):
            reqs = _requests(lengths, rule=rule)
            ref = Engine(model, max_batch=max_batch, max_len=96, schedule=schedule).run(reqs)
            engine = Engine(model, max_batch=max_batch, max_len=96, schedule=schedule)
            captured = []
            engine.graphs = StageGraphs(capture=emulated_capture(engine.stages, captured))
            for _ in range(2):  # the second run replays what the first captured
                out = engine.run(reqs)
                assert [(c.tokens, c.depths) for c in out] == [(c.tokens, c.depths) for c in ref]
            assert captured and len(engine.graphs) == len(captured)


def test_an_engine_and_its_graphs_are_freed_without_the_garbage_collector():
    """No reference cycle keeps an engine (and so its CUDA graphs and their memory pools) alive until a
    garbage collection: such a collection during another engine's capture frees memory (cudaFree) and
    invalidates that capture."""
    model = OpenMythos(tiny_config()).eval()
    gc.disable()
    try:
        engine = Engine(model, max_batch=2, max_len=40)
        engine.graphs = StageGraphs(capture=emulated_capture(engine.stages, []))
        for _ in range(2):
            engine.run(_requests([3, 5]))
        graphs, engine_ref = weakref.ref(engine.graphs), weakref.ref(engine)
        del engine
        assert engine_ref() is None and graphs() is None
    finally:
        gc.enable()


def test_scoped_compile_leaves_dynamos_limits_as_they_were():
    dynamo = torch._dynamo.config
    before = dynamo.recompile_limit, dynamo.accumulated_recompile_limit
    seen = []

    def stage(x):
        seen.append((dynamo.recompile_limit, dynamo.accumulated_recompile_limit))
        return x + 1

    fn = scoped_compile(stage, n_buckets=5, n_stages=3)
    assert torch.equal(fn(torch.zeros(2)), torch.ones(2))
    assert (dynamo.recompile_limit, dynamo.accumulated_recompile_limit) == before
    assert seen and seen[0] == (before[0] + 10, before[1] + 30)  # raised while the stage is traced
