"""What makes a ``save_pretrained`` directory self-describing and checkable: ``config.json`` (with a
format version and transformers' ``auto_map``), ``model.safetensors`` with a digest of its tensor bytes,
a model card (``README.md``), and two shim modules that let
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` find our classes.

config.json format versions (``format_version``):
  4  every MythosConfig field is present (a missing one is an error, never a silent default).
  3  before the learned loop embedding (``loop_embed``) and sandwich norms (``sandwich_norm``). Migration to 4:
     ``FIELDS_ADDED[4]``.
  2  before sliding-window attention (``attn_window``) and the per-loop state norm (``state_norm``). Migration
     to 3: ``FIELDS_ADDED[3]``.
  1  before the recurrence-recipe fields (issue 27). Migration to 2: ``FIELDS_ADDED[2]``.
  0  files without ``format_version`` (open-mythos before format 1). Migration to 1: ``FIELDS_ADDED[1]``.
Each migration gives the fields added in that version the value that reproduces the model the older
versions built; any other missing field is still an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checks import read_json
from .config import MythosConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REMOTE_CODE = {
    "configuration_open_mythos.py":
        "from open_mythos.hf import OpenMythosConfig  # noqa: F401  (pip install 'open-mythos[hf]')\n",
    "modeling_open_mythos.py":
        "from open_mythos.hf import OpenMythosForCausalLM  # noqa: F401  (pip install 'open-mythos[hf]')\n",
}
AUTO_MAP = {"AutoConfig": "configuration_open_mythos.OpenMythosConfig",
            "AutoModelForCausalLM": "modeling_open_mythos.OpenMythosForCausalLM"}
FORMAT_VERSION = 4
FIELDS_ADDED = {  # format version -> the fields it added, at the values that reproduce older files' models
    1: {"loop_embed_scale": 1.0},  # before the field existed, the loop embedding had amplitude 1
    2: {"injection": "lti", "state_init": "zeros", "loop_out_norm": True, "recurrent_ffn": "moe", "init_loops": None},
    3: {"attn_window": None, "state_norm": False},  # every position saw its whole prefix; the state unnormalised
    4: {"loop_embed": "sinusoid", "sandwich_norm": False},  # the fixed loop table; pre-norm blocks only
}
DIGEST_KEY = "open_mythos.sha256"  # safetensors metadata: sha256 of the tensors (tensor_digest)


def share_file_mode(path: Path) -> None:
    """Give ``path`` the mode every other file of the directory gets (0666 minus the umask):
    safetensors writes its files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_pretrained(directory: str | Path, cfg: MythosConfig, state: dict[str, torch.Tensor],
                     counts: dict[str, int]) -> None:
    """The one writer of a save_pretrained directory (``OpenMythos.save_pretrained``, checkpoint exports):
    ``model.safetensors`` from a full state dict, config.json, model card (``counts``:
    ``OpenMythos.parameter_counts``) and the remote-code shims."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(state, directory / WEIGHTS_NAME, cfg)
    write_config(directory, cfg, counts)


def write_config(directory: Path, cfg: MythosConfig, counts: dict[str, int]) -> None:
    config = {"format_version": FORMAT_VERSION, "model_type": "open_mythos",
              "architectures": ["OpenMythosForCausalLM"], "auto_map": AUTO_MAP, **cfg.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    for name, text in REMOTE_CODE.items():
        (directory / name).write_text(text)
    (directory / "README.md").write_text(model_card(cfg, counts))


def migrate_config(d: dict) -> dict:
    """A config.json's dict at format ``FORMAT_VERSION`` (see the module docstring); ValueError naming the
    missing fields, or a version newer than this code reads."""
    version = d.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= FORMAT_VERSION:
        raise ValueError(f"format_version {version!r} is not one this open-mythos reads (0..{FORMAT_VERSION}): "
                         "a newer open-mythos wrote it")
    d = dict(d)
    for added_in in range(version + 1, FORMAT_VERSION + 1):
        for name, value in FIELDS_ADDED[added_in].items():
            d.setdefault(name, value)
    d["format_version"] = FORMAT_VERSION
    missing = [f.name for f in dataclasses.fields(MythosConfig) if f.name not in d]
    if missing:
        raise ValueError(f"missing MythosConfig field(s): {', '.join(missing)}")
    return d


def read_config(directory: str | Path) -> MythosConfig:
    """The MythosConfig of a save_pretrained directory; ValueError naming the file and the problem."""
    path = Path(directory) / CONFIG_NAME
    try:
        return MythosConfig.from_dict(migrate_config(read_json(path)))
    except ValueError as err:
        raise ValueError(err if str(err).startswith(str(path)) else f"{path}: {err}") from None


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: each one's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """A safetensors file whose metadata records ``tensor_digest`` of its tensors (under DIGEST_KEY)."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={DIGEST_KEY: tensor_digest(tensors)})
    share_file_mode(Path(path))


def save_weights(state: dict[str, torch.Tensor], path: str | Path, cfg: MythosConfig) -> None:
    """A model's full state dict as ``model.safetensors``; ``head.weight`` is left out when tied to the
    embedding (``from_pretrained`` re-ties it)."""
    save_tensors({k: v for k, v in state.items() if not (cfg.tie_word_embeddings and k == "head.weight")}, path)


def verify_tensors(path: str | Path) -> bool:
    """Check a safetensors file's tensors against the digest in its metadata: True when they match, False
    when the file records none (written before digests); ValueError naming the file when damaged."""
    try:
        with safe_open(str(path), "pt") as f:
            recorded = (f.metadata() or {}).get(DIGEST_KEY)
            if recorded is None:
                return False
            actual = tensor_digest({k: f.get_tensor(k) for k in f.keys()})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if actual != recorded:
        raise ValueError(f"{path}: the tensor bytes are damaged (sha256 {actual}, the file records {recorded}); "
                         "re-download or re-export it (verify=False loads it anyway)")
    return True


def model_card(cfg: MythosConfig, counts: dict[str, int]) -> str:
    return f"""---
library_name: open-mythos
tags: [recurrent-depth-transformer, looped-transformer, mixture-of-experts]
---
# OpenMythos model

A Recurrent-Depth Transformer (Prelude -> looped recurrent block -> Coda) saved by
[open-mythos](https://github.com/open-mythos/open-mythos).

| | |
|---|---|
| parameters | {counts['total']:,} total, {counts['active']:,} active per token |
| layers | {cfg.prelude_layers} prelude + 1 recurrent block (looped, up to {cfg.max_loop_iters} trained loops) + {cfg.coda_layers} coda |
| width | dim {cfg.dim}, {cfg.n_heads} heads, attention {cfg.attn_type} |
| experts | {cfg.n_experts} routed (top-{cfg.n_experts_per_tok}, expert dim {cfg.expert_dim}) + {cfg.n_shared_experts} shared |
| context | {cfg.max_seq_len} tokens, vocabulary {cfg.vocab_size} |

## Use

```python
from open_mythos import OpenMythos
model = OpenMythos.from_pretrained("THIS_DIR")
logits = model(ids, n_loops={cfg.max_loop_iters})       # more loops = more compute per token

import open_mythos.hf                                    # pip install 'open-mythos[hf]'
from transformers import AutoModelForCausalLM
hf_model = AutoModelForCausalLM.from_pretrained("THIS_DIR")   # or trust_remote_code=True without the import
out = hf_model.generate(ids, max_new_tokens=32, n_loops=8)
```

Weights: `model.safetensors` (no pickle). Serve: `mythos serve --model THIS_DIR`.
"""  # noqa: E501  (markdown table rows)
