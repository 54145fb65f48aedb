"""`TrainConfig`: one dataclass tree for a training run, loaded from TOML with CLI overrides.

    [model]  MythosConfig fields        [data]  DataConfig        [optim]  OptimConfig
    [loops]  LoopConfig (depth curriculum)   [exit]  ExitConfig (halting unit)   top level: the run itself

Presets live in ``training/presets/*.toml``. Overrides are ``section.field=value`` with TOML values
(``steps=200``, ``optim.muon_lr=0.01``, ``model.attn_type="gqa"``; bare words are strings).
Every field is validated; unknown keys raise ``ValueError`` naming them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..config import MythosConfig, check_field_types
from .data import DataConfig
from .exit import ExitConfig
from .optim import OptimConfig
from .speed import CUDAGRAPH_COMPILE_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOOP_SCHEDULES = ("fixed", "poisson_lognormal", "uniform", "progressive")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class LoopConfig:
    """How many recurrent iterations each training step runs, and through how many the gradient flows.

    fixed: always ``mean``. uniform: integer in [min_sampled, max_sampled].
    poisson_lognormal (Huginn): n ~ 1 + Poisson(lambda), log lambda ~ N(log(mean - 1) - sigma^2/2, sigma),
    clamped to [min_sampled, max_sampled]. ``backprop``: gradient flows through the last k loops only (0 = all).
    progressive (Bansal et al. 2022, "progressive loss"): a random start, n ~ U{0 .. m - min_sampled}
    loops without gradient, then k ~ U{max(1, min_sampled - n) .. m - n} loops with gradient, m =
    ``max_sampled``; the step runs n + k loops and backpropagates through the last k. The block cannot
    learn behaviour tied to a loop index: it learns to improve whatever state it is given.
    ``warmup_steps``: the first steps run one loop (an RDT learns content lookups at one loop and keeps
    them when looped, but does not learn them while looped: docs/experiments.md, k-hop).
    The draw depends only on (seed, step): resume-exact and equal on every rank.
    """

    schedule: str = "poisson_lognormal"
    mean: int = 4
    sigma: float = 0.5
    min_sampled: int = 1          # the range of sampled loop counts (formerly min_loops / max_loops)
    max_sampled: int = 16
    backprop: int = 0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        check_field_types(self, "loops.")
        if self.schedule not in LOOP_SCHEDULES:
            raise ValueError(f"loops.schedule must be one of {LOOP_SCHEDULES}, got {self.schedule!r}")
        if not 1 <= self.min_sampled <= self.mean <= self.max_sampled:
            raise ValueError(f"need 1 <= loops.min_sampled <= loops.mean <= loops.max_sampled, got "
                             f"{self.min_sampled}, {self.mean}, {self.max_sampled}")
        if self.sigma < 0:
            raise ValueError(f"loops.sigma must be >= 0, got {self.sigma}")
        if self.backprop < 0:
            raise ValueError(f"loops.backprop must be >= 0 (0 = all loops), got {self.backprop}")
        if self.schedule == "progressive" and self.backprop:
            raise ValueError("loops.backprop must be 0 with loops.schedule='progressive' (it draws its own)")
        if self.warmup_steps < 0:
            raise ValueError(f"loops.warmup_steps must be >= 0, got {self.warmup_steps}")

    def sample(self, seed: int, step: int) -> int:
        """The loop count of training step ``step``."""
        return self.draw(seed, step)[0]

    def draw(self, seed: int, step: int) -> tuple[int, int | None]:
        """(loops, loops with gradient or None for all) of training step ``step``."""
        if step < self.warmup_steps:
            return 1, None
        backprop = self.backprop or None
        if self.schedule == "fixed":
            return self.mean, backprop
        g = torch.Generator().manual_seed(seed * 1_000_033 + step)
        if self.schedule == "uniform":
            return int(torch.randint(self.min_sampled, self.max_sampled + 1, (), generator=g)), backprop
        if self.schedule == "progressive":
            start = int(torch.randint(0, self.max_sampled - self.min_sampled + 1, (), generator=g))
            grad = int(torch.randint(max(1, self.min_sampled - start), self.max_sampled - start + 1, (), generator=g))
            return start + grad, grad
        mu = math.log(max(self.mean - 1, 1e-3)) - self.sigma ** 2 / 2
        rate = math.exp(mu + self.sigma * float(torch.randn((), generator=g)))
        n = 1 + int(torch.poisson(torch.tensor(rate), generator=g))
        return max(self.min_sampled, min(self.max_sampled, n)), backprop


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    model: MythosConfig = field(default_factory=MythosConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loops: LoopConfig = field(default_factory=LoopConfig)
    exit: ExitConfig = field(default_factory=ExitConfig)
    steps: int = 1000
    batch_size: int = 16            # global batch, in sequences, per optimizer step
    grad_accum: int = 1             # micro-batches per step (batch_size / grad_accum each)
    precision: str = "auto"         # auto: bf16 on CUDA with bf16, fp16 + GradScaler on older CUDA, fp32 on CPU
    device: str = "auto"
    compile: bool = False           # torch.compile the blocks (the loop iteration once, reused per loop) and the loss
    compile_mode: str = "default"   # torch.compile mode; "reduce-overhead" adds CUDA graphs
    activation_checkpointing: bool = False
    step_graph: bool = False        # the whole step as CUDA graphs (training/graphs.py): bf16 on a GPU, one process/DDP
    parallel: str = "ddp"           # ddp | fsdp (used under torchrun with >1 process)
    grad_bucket_mb: float = 25.0    # step_graph + ddp: gradient all-reduce buckets, launched during the backward
                                    # (0: one all-reduce after it); distributed.GradientAllReduce
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 0             # 0: evaluate only at the end
    eval_batches: int = 8
    ckpt_every: int = 0             # 0: checkpoint only at the end
    keep_last: int = 2
    max_bad_steps: int = 5          # consecutive non-finite steps before training stops
    sweep_loops: list[int] = field(default_factory=list)  # loop counts for the final eval sweep
    sample_prompt: str = ""
    sample_tokens: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.out_dir.strip():
            raise ValueError("out_dir must name a directory (e.g. runs/my-run), got an empty string")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.step_graph and self.compile_mode in CUDAGRAPH_COMPILE_MODES:
            raise ValueError(f"step_graph=true captures the whole step in CUDA graphs; compile_mode="
                             f"{self.compile_mode!r} adds its own: use 'default' or 'max-autotune-no-cudagraphs'")
        if self.step_graph and self.optim.muon_impl != "batched":
            raise ValueError("step_graph=true needs optim.muon_impl='batched' (torch.optim.Muon bakes the "
                             "learning rate into a captured graph as a constant)")
        if not self.grad_bucket_mb >= 0:
            raise ValueError("grad_bucket_mb must be >= 0 (0 = one all-reduce after the backward), "
                             f"got {self.grad_bucket_mb}")
        if self.step_graph and self.loops.schedule == "progressive":
            raise ValueError("step_graph=true captures one graph per loop count; loops.schedule='progressive' "
                             "also varies the loops with gradient per step: use another schedule")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        if self.exit.steps and self.model.loop_output != "final":
            raise ValueError("exit.steps trains the halting unit of loop_output='final' models; with "
                             "model.loop_output='act' the LM loss already trains it (set exit.steps=0)")
        if any(n < 1 for n in self.sweep_loops):
            raise ValueError(f"sweep_loops must be loop counts >= 1, got {self.sweep_loops}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def exit_loops(self) -> int:
        """The depth the exit labels look at: ``exit.loops``, or ``loops.max_sampled`` when 0."""
        return self.exit.loops or self.loops.max_sampled


SECTIONS = {"model": MythosConfig, "data": DataConfig, "optim": OptimConfig, "loops": LoopConfig,
            "exit": ExitConfig}
# old spellings of config keys, still read (with a DeprecationWarning): section -> {old: new}
RENAMED_KEYS = {"loops": {"min_loops": "min_sampled", "max_loops": "max_sampled"}}


def presets_dir() -> Path:
    return Path(str(resources.files("open_mythos.training").joinpath("presets")))


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not all(key.strip().split(".")):
            raise ValueError(f"override {item!r} must look like key=value or section.field=value "
                             "(e.g. steps=100, optim.muon_lr=0.01)")
        *path, last = key.strip().split(".")
        last = _new_key(".".join(path), last)
        node = tree
        for depth, part in enumerate(path):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key.strip()!r}: {'.'.join(path[:depth + 1])!r} is a value, not a "
                                 "section with fields")
        node[last] = _parse_value(value.strip())
    return tree


def config_from_dict(tree: dict[str, Any]) -> TrainConfig:
    top_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(tree) - top_fields)
    if unknown:
        raise ValueError(f"unknown training config key(s): {', '.join(unknown)}{_nearest(unknown, top_fields)}")
    kwargs: dict[str, Any] = {}
    for key, value in tree.items():
        if key in SECTIONS:
            cls = SECTIONS[key]
            if not isinstance(value, dict):
                raise ValueError(f"[{key}] must be a table")
            value = {_new_key(key, k): v for k, v in value.items()}
            names = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(value) - names)
            if bad:
                raise ValueError(f"unknown field(s) in [{key}]: {', '.join(bad)}{_nearest(bad, names)}")
            kwargs[key] = MythosConfig.from_dict(value) if cls is MythosConfig else cls(**value)
        else:
            kwargs[key] = value
    return TrainConfig(**kwargs)


def _nearest(unknown: list[str], known: set[str]) -> str:
    """`` (did you mean steps?)`` for misspelt keys, or nothing."""
    near = [m for key in unknown for m in difflib.get_close_matches(key, sorted(known), n=1)]
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _new_key(section: str, key: str) -> str:
    """A config key's current spelling (an old one is renamed, with a DeprecationWarning)."""
    new = RENAMED_KEYS.get(section, {}).get(key)
    if new is None:
        return key
    warnings.warn(f"{section}.{key} is now {section}.{new}", DeprecationWarning, stacklevel=3)
    return new


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: list[str] | None = None) -> TrainConfig:
    """Preset (by name) and/or TOML file (file values win), then ``overrides``. An override of
    ``data.source`` without one of ``data.path`` drops the inherited ``data.path`` (it belonged to the old source)."""
    tree: dict[str, Any] = {}
    if preset is not None:
        file = presets_dir() / f"{preset}.toml"
        if not file.is_file():
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}")
        tree = tomllib.loads(file.read_text())
    if path is not None:
        try:
            table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid TOML ({err})") from None
        for key, value in table.items():
            if isinstance(value, dict):
                tree.setdefault(key, {}).update({_new_key(key, k): v for k, v in value.items()})
            else:
                tree[key] = value
    overrides = overrides or []
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    if "data.source" in keys and "data.path" not in keys:  # the inherited path belongs to the inherited source
        tree.get("data", {}).pop("path", None)
    return config_from_dict(apply_overrides(tree, overrides))
