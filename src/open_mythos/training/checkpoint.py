"""Checkpoints: atomic, keep-last-N, no pickle of untrusted bytes.

    runs/<name>/checkpoints/step_00000200/
        dcp/                    model + optimizer state, torch.distributed.checkpoint (sharded,
                                reshardable: a 2-GPU checkpoint resumes on 1 GPU and vice versa)
        model.safetensors       full weights for export (OpenMythos.from_pretrained reads this dir)
        config.json
        rng_rank{r}.safetensors every rank's CPU/CUDA RNG state
        trainer_state.json      step, data position, schedulers, grad scaler, counters; written last

A checkpoint is written to ``step_N.tmp`` and renamed to ``step_N`` only when complete. Re-saving an
existing step renames the old one aside (``step_N.old``), the new one in, then deletes the old; pruned
checkpoints are renamed aside before they are deleted. So a run killed at any moment (even kill -9)
leaves a complete ``step_N`` or ``step_N.old`` of every step it finished, never a partial one under
either name; ``latest_checkpoint`` also skips any directory without every file above.

DCP writes its ``dcp/.metadata`` with pickle and loads non-tensor values with ``torch.load``; here both
are read without running code: the metadata by an unpickler that admits only DCP's metadata classes
(``MetadataUnpickler``), the values with ``weights_only=True`` (``SafeLoadPlanner``).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..checks import read_json
from ..hub import WEIGHTS_NAME, save_tensors, verify_tensors, write_pretrained
from ..variants import count_parameters
from .distributed import DistInfo, barrier, unwrap

TRAINER_STATE = "trainer_state.json"
REQUIRED_FILES = (TRAINER_STATE, "dcp/.metadata", WEIGHTS_NAME, "config.json")
ASIDE = ".old"  # suffix of a checkpoint moved out of the way before it is deleted


# ---------------------------------------------------------------------------------- reading DCP safely
class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, admitting only the classes DCP's metadata is made of (its
    dataclasses, torch.Size, dtypes, layouts, paths); any other global (a callable that would run code)
    raises ``pickle.UnpicklingError``."""

    ALLOWED = {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
        ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in self.ALLOWED or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata class")


def read_dcp_metadata(path: Path) -> dcp_metadata.Metadata:
    """A DCP checkpoint's ``.metadata`` read with ``MetadataUnpickler``; ValueError naming the file when it
    is damaged or names anything else."""
    try:
        with path.open("rb") as fh:
            metadata = MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, OSError) as err:
        raise ValueError(f"{path}: refusing to load this checkpoint metadata ({err}); it is damaged or was not "
                         "written by torch.distributed.checkpoint") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise ValueError(f"{path}: not checkpoint metadata (a {type(metadata).__name__})")
    return metadata


class SafeReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader with the metadata read by ``read_dcp_metadata``."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        metadata = read_dcp_metadata(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, loading non-tensor values (optimizer hyper-parameters) with
    ``torch.load(weights_only=True)``: plain data only, no arbitrary classes."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def is_complete(path: Path) -> bool:
    """Whether a checkpoint directory holds every file of a finished save."""
    return all((path / name).is_file() for name in REQUIRED_FILES)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: ``step_N``, or ``step_N.old`` where a replace of step N was
    interrupted after the old one was moved aside."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in sorted(root.iterdir()):  # "step_N" sorts before "step_N.old": the plain name wins
        m = re.fullmatch(rf"step_(\d+)({re.escape(ASIDE)})?", p.name)
        if m and int(m[1]) not in found and p.is_dir() and is_complete(p):
            found[int(m[1])] = p
    return [found[k] for k in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: renamed aside first, so it never lies half-deleted under its name."""
    if path.name.endswith(ASIDE):
        shutil.rmtree(path, ignore_errors=True)
        return
    aside = path.with_name(path.name + ASIDE)
    shutil.rmtree(aside, ignore_errors=True)
    path.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def _replace(tmp: Path, final: Path) -> None:
    """Move the complete checkpoint ``tmp`` to ``final``: an existing ``final`` is renamed aside first and
    deleted last, so at every moment a complete copy of the step exists under a name checkpoint_dirs reads."""
    aside = final.with_name(final.name + ASIDE)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    tmp.rename(final)
    shutil.rmtree(aside, ignore_errors=True)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def export_weights(model: torch.nn.Module, directory: Path, info: DistInfo) -> None:
    """config.json + model.safetensors of the full (unsharded) model, written by rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        base = unwrap(model)
        write_pretrained(directory, base.cfg, full, count_parameters(base.cfg))


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizers: list, trainer_state: dict,
                    info: DistInfo, keep_last: int) -> Path:
    final = run_dir / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    export_weights(model, tmp, info)
    save_tensors(_rng_state(info.device), tmp / f"rng_rank{info.rank}.safetensors")
    barrier()
    if info.is_main:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))  # last: marks the save complete
        _replace(tmp, final)
        keep = checkpoint_dirs(run_dir)[-keep_last:]
        for old in (run_dir / "checkpoints").iterdir():  # older steps, leftovers of interrupted saves
            if old not in keep and old.name.startswith("step_"):
                _remove(old)
    barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizers: list, info: DistInfo) -> dict:
    """Restore model + optimizer state (resharding as needed) and this rank's RNG; return trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state = {"model": model_sd, "optim": optim_sd}
    trainer_state = read_json(path / TRAINER_STATE)
    read_dcp_metadata(path / "dcp" / ".metadata")  # a clear error before DCP starts
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=SafeReader(path / "dcp"), planner=SafeLoadPlanner())
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{info.rank}.safetensors"
    if rng_file.is_file():  # absent when resuming on more ranks than the checkpoint had
        verify_tensors(rng_file)
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], info.device)
    return trainer_state
