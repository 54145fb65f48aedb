"""What makes a ``save_pretrained`` directory self-describing: ``config.json`` (with transformers'
``auto_map``), a model card (``README.md``), and two shim modules that let
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` find our classes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import MythosConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REMOTE_CODE = {
    "configuration_open_mythos.py": "from open_mythos.hf import OpenMythosConfig  # noqa: F401  (pip install 'open-mythos[hf]')\n",
    "modeling_open_mythos.py": "from open_mythos.hf import OpenMythosForCausalLM  # noqa: F401  (pip install 'open-mythos[hf]')\n",
}
AUTO_MAP = {"AutoConfig": "configuration_open_mythos.OpenMythosConfig",
            "AutoModelForCausalLM": "modeling_open_mythos.OpenMythosForCausalLM"}


def share_file_mode(path: Path) -> None:
    """Give ``path`` the mode every other file of the directory gets (0666 minus the umask):
    safetensors writes its files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_config(directory: Path, cfg: MythosConfig) -> None:
    config = {"model_type": "open_mythos", "architectures": ["OpenMythosForCausalLM"], "auto_map": AUTO_MAP,
              **cfg.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    for name, text in REMOTE_CODE.items():
        (directory / name).write_text(text)
    (directory / "README.md").write_text(model_card(cfg))


def model_card(cfg: MythosConfig) -> str:
    from .variants import count_parameters  # variants imports the model, which imports this module

    counts = count_parameters(cfg)
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
"""
