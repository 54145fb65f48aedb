"""Train a tiny byte-level looped model on the shipped Shakespeare sample for a few steps (CPU, seconds),
then evaluate it at several loop counts. `mythos train --preset shakespeare-tiny` is the full run."""

import sys
import tempfile

from open_mythos.training.config import load_config
from open_mythos.training.loop import Trainer

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
with tempfile.TemporaryDirectory() as out:
    cfg = load_config("shakespeare-tiny", overrides=[f"steps={steps}", f"out_dir='{out}'", "eval_every=0",
                                                      "sweep_loops=[1, 2, 4, 8]", "sample_tokens=0"])
    summary = Trainer(cfg, progress=False).train()
    for row in summary["sweep"]:
        print(f"{row['n_loops']:>2} loops: held-out loss {row['loss']:.4f}")
    print(f"exported model: {out}/model (config.json, model.safetensors, README.md)")
