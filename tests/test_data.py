import json
import warnings

import pytest
import torch

from open_mythos import ByteTokenizer
from open_mythos.tokenizer import load_tokenizer
from open_mythos.training.config import load_config
from open_mythos.training.data import (DataConfig, PackedLoader, StreamingLoader, pack_documents, read_documents,
                                       shipped_corpus, split_tokens)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("first document text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    return tmp_path


def test_read_documents_from_files_and_directories(corpus, tmp_path):
    assert list(read_documents(corpus)) == ["first document text", "second", "third"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["from parquet"]}), tmp_path / "c.parquet")
    assert list(read_documents(tmp_path / "c.parquet", text_field="body")) == ["from parquet"]


def test_read_documents_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_documents(tmp_path / "missing.txt"))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="no field 'text'"):
        list(read_documents(tmp_path / "x.jsonl"))
    (tmp_path / "y.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        list(read_documents(tmp_path / "y.csv"))
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(source="files")
    with pytest.raises(ValueError, match="data.source"):
        DataConfig(source="webtext")


def test_held_out_split_is_whole_documents_chosen_by_their_text():
    """Short question-answer documents: every held-out document is whole, so every training document keeps
    its answer; the choice depends on the texts only (not their order) and holds >= val_fraction of tokens."""
    tok = ByteTokenizer()
    eos = tok.eos_token_id
    docs = [f"Q: what is {i} + {i}? A: {2 * i}" for i in range(40)]
    train, val = pack_documents(docs, tok, val_fraction=0.1)

    def documents(stream):
        out, cur = [], []
        for t in stream.tolist():
            if t == eos:
                out.append(tok.decode(cur))
                cur = []
            else:
                cur.append(t)
        return out

    held, kept = documents(val), documents(train)
    assert sorted(held + kept) == sorted(docs)  # whole documents, each on one side
    assert 0.1 <= val.numel() / (train.numel() + val.numel()) < 0.2
    train2, val2 = pack_documents(docs[::-1], tok, val_fraction=0.1)
    assert sorted(documents(val2)) == sorted(held) and sorted(documents(train2)) == sorted(kept)


def test_held_out_split_of_one_document_is_its_tail_with_a_warning():
    tok = ByteTokenizer()
    eos = tok.eos_token_id
    with pytest.warns(UserWarning, match="one document: its last 2 tokens are held out"):
        train, val = pack_documents(["abcdefghij"], tok, val_fraction=0.2)
    assert train.tolist() == [*b"abcdefgh", eos] and val.tolist() == [*b"ij", eos]


def test_the_shakespeare_tiny_preset_holds_out_one_whole_play_without_a_warning():
    """The preset's val_fraction states the split the six shipped plays allow: one play (19.7% of the bytes), the
    same split the default 0.05 made with a warning that it overshot."""
    cfg = load_config("shakespeare-tiny").data
    tok = load_tokenizer(cfg.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, val = split_tokens(cfg, tok)
    with pytest.warns(UserWarning, match=r"held out 1 of 6 whole documents, 19\.7% of the tokens"):
        ref_train, ref_val = pack_documents(read_documents(shipped_corpus()), tok, 0.05)
    assert torch.equal(train, ref_train) and torch.equal(val, ref_val)
    assert tok.decode(val[:-1].tolist()) in list(read_documents(shipped_corpus()))  # one whole play


def test_held_out_split_warns_when_few_long_documents_overshoot():
    tok = ByteTokenizer()
    with pytest.warns(UserWarning, match=r"held out 1 of 3 whole documents, 33\.3% of the tokens"):
        _, val = pack_documents(["a" * 100, "b" * 100, "c" * 100], tok, val_fraction=0.05)
    assert val.numel() == 101


def test_a_given_validation_set_is_held_out_and_everything_else_trained(tmp_path):
    tok = ByteTokenizer()
    eos = tok.eos_token_id
    train, val = pack_documents(["abc", "de"], tok, 0.5, val_docs=["xy"])
    assert train.tolist() == [*b"abc", eos, *b"de", eos] and val.tolist() == [*b"xy", eos]
    with pytest.raises(ValueError, match="data.val_path"):
        DataConfig(source="hf", val_path=str(tmp_path))


@pytest.mark.parametrize("line,match", [("{\"text\": 1}", "field 'text' is not a string"), ("[1]", "no field 'text'"),
                                        ("{oops", "not valid JSON")])
def test_bad_jsonl_rows_name_the_file_and_line(tmp_path, line, match):
    path = tmp_path / "d.jsonl"
    path.write_text("{\"text\": \"fine\"}\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: .*{match}"):
        list(read_documents(path))


def test_packed_loader_is_deterministic_resumable_and_rank_consistent():
    tokens = torch.arange(1000)
    a = PackedLoader(tokens, seq_len=9, global_batch=8, seed=3)
    batches = [a.next_batch() for _ in range(30)]  # > 1 epoch (111 windows / 8 per step)
    x, y = batches[0]
    assert x.shape == (8, 9) and torch.equal(y[:, :-1], x[:, 1:])
    b = PackedLoader(tokens, seq_len=9, global_batch=8, seed=3)
    for _ in range(17):
        b.next_batch()
    state = b.state_dict()
    c = PackedLoader(tokens, seq_len=9, global_batch=8, seed=3)
    c.load_state_dict(state)
    for i in range(17, 30):
        assert torch.equal(c.next_batch()[0], batches[i][0])
    ranks = [PackedLoader(tokens, seq_len=9, global_batch=8, seed=3, rank=r, world_size=2) for r in range(2)]
    r0, r1 = ranks[0].next_batch()[0], ranks[1].next_batch()[0]
    assert torch.equal(torch.stack([r0, r1], 1).flatten(0, 1), x)  # rows r, r+2, ... of the global batch


def test_packed_loader_rejects_too_little_data():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(torch.arange(50), seq_len=9, global_batch=8)


def test_streaming_loader_local_file_and_resume(tmp_path):
    pytest.importorskip("datasets")
    rows = [{"text": f"document number {i} " * 3} for i in range(40)]
    path = tmp_path / "stream.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source="hf", seq_len=16)
    loader = StreamingLoader(cfg, ByteTokenizer(), batch_size=2, data_files=str(path))
    first = [loader.next_batch()[0] for _ in range(3)]
    assert first[0].shape == (2, 16)
    state = loader.state_dict()
    expected = [loader.next_batch()[0] for _ in range(3)]
    resumed = StreamingLoader(cfg, ByteTokenizer(), batch_size=2, data_files=str(path))
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch()[0], want)


def test_stdlib_source_reads_library_modules_only(tmp_path, monkeypatch):
    """The stdlib source yields every .py file's text in path order, without test suites, installed packages,
    or files that are not UTF-8; DataConfig accepts it by name."""
    import sysconfig

    from open_mythos.training.data import DataConfig, stdlib_documents

    files = {"os.py": "import sys\n", "json/__init__.py": "x = 1\n", "test/test_os.py": "bad\n",
             "idlelib/idle_test/t.py": "bad\n", "site-packages/pkg/m.py": "bad\n", "json/tests/t.py": "bad\n",
             "README.txt": "bad\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "latin.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8: skipped
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert list(stdlib_documents()) == ["x = 1\n", "import sys\n"]  # json/__init__.py < os.py
    assert DataConfig(source="stdlib").source == "stdlib"
