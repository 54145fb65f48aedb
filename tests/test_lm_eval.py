"""lm-evaluation-harness adapter: the scores equal direct model computations, and lm-eval runs it
on tiny local tasks (multiple choice, rolling perplexity, generation) from Python and the CLI."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from open_mythos import OpenMythos  # noqa: E402
from open_mythos.cli import demo_config  # noqa: E402
from open_mythos.tokenizer import ByteTokenizer, save_tokenizer_name  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval"
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    OpenMythos(demo_config()).save_pretrained(directory)
    save_tokenizer_name(directory, "byte")
    return directory


def test_scores_equal_a_direct_computation(model_dir):
    from open_mythos.eval.harness import OpenMythosLM

    lm = OpenMythosLM(str(model_dir), n_loops=2, batch_size=2)
    model = OpenMythos.from_pretrained(model_dir)
    pairs = [("The capital of France is", " Paris"), ("Two plus", " two is four"), ("", "hello")]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ctx_ids = TOK.encode(ctx) if ctx else [TOK.eos_token_id]
        ids = ctx_ids + TOK.encode(cont)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids[:-1]]), 2)[0], -1)
        n = len(TOK.encode(cont))
        rows, target = logp[-n:], torch.tensor(ids[-n:])
        assert ll == pytest.approx(rows.gather(-1, target[:, None]).sum().item(), rel=1e-5, abs=1e-4)
        assert greedy == bool((rows.argmax(-1) == target).all())
    text = "Now is the winter of our discontent"
    rolling = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0]
    ids = [TOK.eos_token_id] + TOK.encode(text)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]]), 2)[0], -1)
    assert rolling == pytest.approx(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item(), rel=1e-5)
    out = lm.generate_until([SimpleNamespace(args=("ROMEO:", {"until": ["\n"], "max_gen_toks": 8}))])[0]
    assert "\n" not in out and len(TOK.encode(out)) <= 8


def test_generate_until_with_a_budget_as_long_as_the_context(tmp_path):
    """lm-eval's default max_gen_toks (256) is the whole context of a model like shakespeare-tiny (context and
    max output 256): the budget is capped so that the prompt keeps its last token, and generation runs."""
    from open_mythos.eval.harness import OpenMythosLM

    torch.manual_seed(0)
    OpenMythos(dataclasses.replace(demo_config(), max_output_tokens=256)).save_pretrained(tmp_path)
    lm = OpenMythosLM(str(tmp_path), n_loops=1, device="cpu")
    assert lm.engine.max_len == 256
    for max_gen in (256, 300):
        out = lm.generate_until([SimpleNamespace(args=("ROMEO: " * 5, {"until": ["\n\n\n"], "max_gen_toks": max_gen}))])
        assert len(TOK.encode(out[0])) <= 255


def _write_tasks(directory: Path) -> None:
    choice = DATA / "tiny_choice.jsonl"
    text = DATA / "tiny_text.jsonl"
    (directory / "mythos_choice.yaml").write_text(f"""task: mythos_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {choice}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    (directory / "mythos_rolling.yaml").write_text(f"""task: mythos_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {text}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    (directory / "mythos_gen.yaml").write_text(f"""task: mythos_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {text}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""")


def test_lm_eval_runs_the_model_on_local_tasks(model_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import open_mythos.eval.harness  # noqa: F401  registers "open_mythos"

    _write_tasks(tmp_path)
    results = lm_eval.simple_evaluate(model="open_mythos", model_args=f"pretrained={model_dir},n_loops=2",
                                      tasks=["mythos_choice", "mythos_rolling", "mythos_gen"],
                                      task_manager=TaskManager(include_path=str(tmp_path)))["results"]
    assert 0.0 <= results["mythos_choice"]["acc,none"] <= 1.0
    assert results["mythos_rolling"]["word_perplexity,none"] > 1.0
    assert "exact_match,none" in results["mythos_gen"]


def test_mythos_lm_eval_command(model_dir, tmp_path):
    _write_tasks(tmp_path)
    cmd = [sys.executable, "-c", "from open_mythos.eval.harness import main; main()", "--model", "open_mythos",
           "--model_args", f"pretrained={model_dir},n_loops=3", "--device", "cpu", "--tasks", "mythos_choice",
           "--include_path",
           str(tmp_path), "--output_path", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mythos_choice" in out.stdout
    written = list((tmp_path / "out").rglob("*.json"))
    assert written and "mythos_choice" in json.loads(written[0].read_text())["results"]
