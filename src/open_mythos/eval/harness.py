"""lm-evaluation-harness adapter (optional extra ``[eval]``): model type ``open_mythos``.

    mythos-lm-eval --model open_mythos --model_args pretrained=DIR,n_loops=8 --tasks hellaswag

``mythos-lm-eval`` is lm-eval's own command line with this module imported first (lm-eval finds
models only through its registry, which an installed package cannot extend from outside); from
Python, ``import open_mythos.eval.harness`` and call ``lm_eval.simple_evaluate(model="open_mythos", ...)``.

Model args: ``pretrained`` (a save_pretrained directory), ``n_loops`` (loop budget, default the
config's), ``device``, ``dtype`` (float32 | bfloat16 | float16), ``batch_size``, and for
generation ``exit_rule`` (none | act | rel_change | kl) with ``exit_threshold``.

loglikelihood: log p(continuation | context) summed over the continuation tokens, and whether
greedy decoding would produce it. loglikelihood_rolling: the whole text scored in disjoint windows
of the context length (lm-eval's rolling windows). generate_until: the inference engine with the
request's stop strings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..inference import Engine, ExitRule, Request
from ..inference.text import generate_text
from ..model import OpenMythos
from ..checks import parse_dtype
from ..sampling import SamplingParams
from ..tokenizer import tokenizer_for

@register_model("open_mythos")
class OpenMythosLM(LM):
    def __init__(self, pretrained: str, n_loops: int | None = None, device: str | None = None, dtype: str = "float32",
                 batch_size: int | str = 8, max_batch: int = 8, exit_rule: str = "none",
                 exit_threshold: float | None = None, **_):
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available: pass --device cpu")
        self.model = OpenMythos.from_pretrained(pretrained, device=device, dtype=parse_dtype(dtype))
        self.tokenizer = tokenizer_for(pretrained, self.model.cfg.vocab_size)
        self.n_loops = int(n_loops) if n_loops is not None else None
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.engine = Engine(self.model, max_batch=int(max_batch),
                             max_loop_budget=max(self.n_loops or 0, self.model.cfg.max_loop_iters))
        self.exit_rule = ExitRule(exit_rule, float(exit_threshold) if exit_threshold is not None else None)
        self.max_length = self.model.cfg.max_seq_len

    # ------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), greedy?) for token-id pairs; right-padded batches
        (causal attention: padding after a sequence never changes its logits)."""
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start: start + self.batch_size]
            seqs = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in chunk]
            width = max(len(s) for s in seqs) - 1
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s) - 1] = torch.tensor(s[:-1])
            logp = F.log_softmax(self.model(ids.to(self._device), self.n_loops).float(), dim=-1)
            for i, ((_, cont), s) in enumerate(zip(chunk, seqs)):
                n = len(cont)
                rows = logp[i, len(s) - 1 - n: len(s) - 1]                       # predictions of cont
                target = torch.tensor(cont, device=rows.device)
                out.append((rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())))
        return out

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # trailing spaces of the context belong to the continuation (lm-eval's convention)
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        ctx = self.tokenizer.encode(stripped) if stripped else [self.tokenizer.eos_token_id]
        return ctx, self.tokenizer.encode(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for r in requests:
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tokenizer.encode(r.args[0]), prefix_token=self.tokenizer.eos_token_id,
                max_seq_len=self.max_length, context_len=1)]
            results.append(sum(ll for ll, _ in self._score(windows)))
        return results

    # ------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        reqs, stops = [], []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            # the budget leaves room for at least one prompt token (lm-eval's default max_gen_toks is 256,
            # which can be the whole context); the prompt keeps its last max_len - max_new tokens
            max_new = min(int(kwargs.get("max_gen_toks", 256)), self.model.cfg.max_output_tokens,
                          self.engine.max_len - 1)
            if max_new < 1:
                raise ValueError(f"max_gen_toks must be >= 1, got {kwargs.get('max_gen_toks')!r}")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            tokens = self.tokenizer.encode(context) or [self.tokenizer.eos_token_id]
            prompt = tokens[max(0, len(tokens) - (self.engine.max_len - max_new)):]
            reqs.append(Request(prompt, max_new, self.n_loops, SamplingParams(temperature), self.exit_rule,
                                (self.tokenizer.eos_token_id,), seed=0))
            stops.append(until)
        return generate_text(self.engine, self.tokenizer, reqs, stops)


def main() -> None:
    """``mythos-lm-eval``: lm-eval's command line with the ``open_mythos`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
