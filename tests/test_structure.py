"""The source tree's structure: an acyclic, layered import graph (built with ``ast``), drivers that reach the
model only through its stage API, and no module too long to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "open_mythos"
PACKAGE = "open_mythos"

# lower layers never import higher ones; a module may import its own layer or any lower one
LAYERS = [
    {"config", "checks", "loss", "layers", "cache", "sampling", "tokenizer", "plot", "hub"},  # foundations
    {"attention", "moe"},                                                   # model components
    {"blocks"},
    {"recurrence"},
    {"model"},                                                              # the architecture
    {"variants", "flops", "main", "__init__"},                             # scales, counts, re-exports
    {"inference", "training", "eval", "experiments", "hf"},                 # drivers and integrations
    {"serving", "cli"},                                                     # applications
]
MAX_LINES = 450
# what the model's drivers may not touch: its modules (they call OpenMythos's stage methods instead)
MODEL_INTERNALS = {"recurrent", "prelude", "coda", "embed", "head", "lora", "injection", "act", "block", "out_norm"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The open_mythos modules ``name`` imports anywhere in its file (top level or inside functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t.startswith(PACKAGE):  # the deepest known module the name refers to
                while t and t not in known:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for i, group in enumerate(LAYERS):
        if key in group:
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def test_the_import_graph_is_read_from_the_source():
    graph = import_graph()
    assert "open_mythos.model" in graph["open_mythos.inference.engine"]
    assert "open_mythos.config" in graph["open_mythos.model"]
    assert "open_mythos.inference.exit" in graph["open_mythos.inference"]  # the package's __init__


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_module_imports_a_higher_layer():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets if layer(b) > layer(a)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_drivers_reach_the_model_only_through_its_stage_api():
    """inference/ never touches the model's modules (``model.recurrent.block``, ``.lora``, ``.act``, ...)."""
    hits = []
    for path in sorted((SRC / "inference").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in MODEL_INTERNALS:
                hits.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not hits, "\n".join(hits)


def test_model_files_hold_no_training_or_speed_switches():
    """Compile, cast-once and activation checkpointing are the trainer's (training/speed.py)."""
    for name in ("model", "recurrence", "blocks", "moe", "attention", "layers"):
        text = (SRC / f"{name}.py").read_text()
        for switch in ("checkpoint_loops", "compiled_step", "compiled_halt", "cast_matrices_once", "torch.compile("):
            assert switch not in text, f"{name}.py: {switch}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_module_is_too_long(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)}: {n} lines > {MAX_LINES}"
