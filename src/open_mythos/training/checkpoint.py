"""Checkpoints: atomic, keep-last-N, no pickle.

    runs/<name>/checkpoints/step_00000200/
        dcp/                    model + optimizer state, torch.distributed.checkpoint (sharded,
                                reshardable: a 2-GPU checkpoint resumes on 1 GPU and vice versa)
        model.safetensors       full weights for export (OpenMythos.from_pretrained reads this dir)
        config.json
        trainer_state.json      step, data position, schedulers, grad scaler, counters
        rng_rank{r}.safetensors every rank's CPU/CUDA RNG state

A checkpoint is written to ``step_N.tmp`` and renamed to ``step_N`` only when complete, so a run
killed at any moment (even kill -9) leaves either the previous checkpoint or the new one, never a
partial one. Only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..hub import WEIGHTS_NAME, share_file_mode, write_config
from .distributed import DistInfo, unwrap


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


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
        if base.cfg.tie_word_embeddings:
            full.pop("head.weight", None)  # tied to embed.weight; from_pretrained re-ties
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in full.items()}, str(directory / WEIGHTS_NAME))
        share_file_mode(directory / WEIGHTS_NAME)
        write_config(directory, base.cfg)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizers: list, trainer_state: dict,
                    info: DistInfo, keep_last: int) -> Path:
    final = run_dir / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    export_weights(model, tmp, info)
    save_file(_rng_state(info.device), str(tmp / f"rng_rank{info.rank}.safetensors"))
    _barrier()
    if info.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic on POSIX: the checkpoint appears complete or not at all
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizers: list, info: DistInfo) -> dict:
    """Restore model + optimizer state (resharding as needed) and this rank's RNG; return trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{info.rank}.safetensors"
    if rng_file.is_file():  # absent when resuming on more ranks than the checkpoint had
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], info.device)
    return json.loads((path / "trainer_state.json").read_text())
