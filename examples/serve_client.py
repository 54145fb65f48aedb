"""Start `mythos serve` in-process on a random tiny model and talk to it with the openai client:
a completion with the n_loops extension, and a streamed chat. (Against a real server, keep only
the client part: OpenAI(base_url="http://localhost:8000/v1", api_key="unused").)"""

import torch
from openai import OpenAI

from open_mythos import OpenMythos
from open_mythos.cli import demo_config
from open_mythos.inference import Engine
from open_mythos.serving import build_app, serve_in_thread
from open_mythos.tokenizer import ByteTokenizer

torch.manual_seed(0)
app = build_app(Engine(OpenMythos(demo_config()).eval(), max_batch=4), ByteTokenizer(), "demo")
server, url = serve_in_thread(app)

client = OpenAI(base_url=f"{url}/v1", api_key="unused")
reply = client.completions.create(model="demo", prompt="To be", max_tokens=12, temperature=0,
                                  extra_body={"n_loops": 2, "exit_rule": {"kind": "kl", "threshold": 1e-3}})
print("completion:", repr(reply.choices[0].text), "loops per token:", reply.model_extra["mythos"]["loop_depths"])
stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello"}],
                                        max_tokens=12, stream=True)
print("chat (streamed):", repr("".join(chunk.choices[0].delta.content or "" for chunk in stream)))
server.should_exit = True
