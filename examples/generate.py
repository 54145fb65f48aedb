"""Generate with the inference engine: ragged prompts in one batch, a loop budget per request,
per-token early exit (KL between successive loops), streamed text. Pass a model directory
(e.g. runs/shakespeare-tiny/model) or nothing for a random tiny model."""

import sys

import torch

from open_mythos import OpenMythos
from open_mythos.cli import demo_config
from open_mythos.inference import Engine, ExitRule, Request
from open_mythos.inference.text import generate_text
from open_mythos.sampling import SamplingParams
from open_mythos.tokenizer import ByteTokenizer, tokenizer_for

if len(sys.argv) > 1:
    model = OpenMythos.from_pretrained(sys.argv[1])
    tok = tokenizer_for(sys.argv[1], model.cfg.vocab_size)
else:
    torch.manual_seed(0)
    model, tok = OpenMythos(demo_config()).eval(), ByteTokenizer()

engine = Engine(model, max_batch=4, max_loop_budget=8)
prompts = ["ROMEO.\n", "To be, or not to be", "O"]
requests = [Request(tok.encode(p), max_new_tokens=24, n_loops=n, sampling=SamplingParams(temperature=0.8, top_p=0.95),
                    exit_rule=ExitRule("kl", 1e-3), eos_token_ids=(tok.eos_token_id,), seed=i)
            for i, (p, n) in enumerate(zip(prompts, (2, 4, 8)))]
texts = generate_text(engine, tok, requests, stops=[["\n\n"]] * len(prompts))
for prompt, text in zip(prompts, texts):
    print(repr(prompt + text))
print("loops per token:", dict(sorted(engine.depth_histogram.items())))
