import json

import pytest
import torch

from open_mythos import ByteTokenizer
from open_mythos.training.data import DataConfig, PackedLoader, StreamingLoader, pack_documents, read_documents


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


def test_packing_separates_documents_and_holds_out_each_tail():
    tok = ByteTokenizer()
    train, val = pack_documents(["abcdefghij", "klmnopqrst"], tok, val_fraction=0.2)
    eos = tok.eos_token_id
    assert train.tolist() == [*b"abcdefgh", eos, *b"klmnopqr", eos]
    assert val.tolist() == [*b"ij", eos, *b"st", eos]


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
