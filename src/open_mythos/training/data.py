"""Training data: documents -> tokens -> packed fixed-length sequences -> resumable batches.

Sources
* ``shakespeare``: the corpus shipped inside the package (no network).
* ``stdlib``: the running Python's standard library source (``*.py``, ~12 MB for CPython 3.11; no
  network, no download, the same on every machine with the same Python version).
* ``files``: a ``.txt`` / ``.jsonl`` / ``.parquet`` file or a directory of them (``text_field`` for
  jsonl/parquet rows).
* ``hf``: a Hugging Face dataset streamed with ``datasets`` (default FineWeb-Edu sample-10BT), split
  by rank, resumable through the dataset's own ``state_dict``.
* any callable registered in ``SOURCES`` returning documents.
* ``task``: problems generated on the fly by a synthetic task (``data.task``, see ``tasks.py``).

Packing: documents are tokenized, joined with the tokenizer's end-of-text id between them, and cut
into windows of ``seq_len + 1`` tokens (inputs = window[:-1], labels = window[1:]).
Held-out split (``pack_documents``): a separate ``val_path`` when given; otherwise whole documents, chosen
by the sha256 of their text, until they hold ``val_fraction`` of the tokens; only a single document is
split inside (its last ``val_fraction``). Train and eval never overlap, and no document loses its end.

Batches come from :class:`PackedLoader`: a seeded permutation per epoch over the windows, the
global batch split across ranks, and a ``state_dict`` of (epoch, cursor) for exact resume.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..config import check_field_types
from .tasks import TASKS, TaskLoader, build_task

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class DataConfig:
    source: str = "shakespeare"           # shakespeare | stdlib | files | hf | a name in SOURCES
    path: str | None = None               # files: a file or directory
    tokenizer: str = "byte"               # byte | o200k_harmony
    seq_len: int = 256
    val_fraction: float = 0.05
    text_field: str = "text"
    val_path: str | None = None           # held-out documents, a file or directory (default: pack_documents' rule)
    hf_dataset: str = "HuggingFaceFW/fineweb-edu"
    hf_name: str | None = "sample-10BT"
    hf_split: str = "train"
    task: str | None = None               # task: a name in tasks.TASKS, built with task_args
    task_args: dict = field(default_factory=dict)
    task_by_loops: bool = True            # task: supervise what the step's loop count can resolve (else all)

    def __post_init__(self) -> None:
        check_field_types(self, "data.")
        if self.source not in SOURCES and self.source not in ("hf", "task"):
            raise ValueError(f"data.source must be one of {sorted([*SOURCES, 'hf', 'task'])}, got {self.source!r}")
        if (self.source == "task") != (self.task is not None):
            raise ValueError("data.task names the task exactly when data.source = 'task'")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"data.task must be one of {sorted(TASKS)}, got {self.task!r}")
        if not isinstance(self.task_args, dict):
            raise ValueError(f"data.task_args must be a table, got {self.task_args!r}")
        if self.source != "task" and self.task_args:
            raise ValueError(f"data.task_args is read only when data.source = 'task' (here {self.source!r}): "
                             "add --set data.source=task --set data.task=NAME, or drop data.task_args")
        if self.source == "files" and not self.path:
            raise ValueError("data.path is required when data.source = 'files'")
        if self.source != "files" and self.path is not None:
            raise ValueError(f"data.path is read only when data.source = 'files' (here {self.source!r}): "
                             "add --set data.source=files, or drop data.path")
        if self.tokenizer not in ("byte", "o200k_harmony"):
            raise ValueError(f"data.tokenizer must be 'byte' or 'o200k_harmony', got {self.tokenizer!r}")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_path is not None and self.source == "hf":
            raise ValueError("data.val_path is for the local sources: hf holds out one shard of the stream")


# ---------------------------------------------------------------------------------- documents
def shipped_corpus() -> Path:
    return Path(str(resources.files("open_mythos").joinpath("data/shakespeare")))


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Texts of a .txt/.jsonl/.parquet file, or of every such file under a directory (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"no {'/'.join(TEXT_SUFFIXES)} files under {path}")
        for f in files:
            yield from read_documents(f, text_field)
        return
    if not path.is_file():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist (data.path: a {'/'.join(TEXT_SUFFIXES)} "
                                "file or a directory of them)")
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
                    if not isinstance(row, dict) or text_field not in row:
                        raise ValueError(f"{path}:{lineno}: no field {text_field!r} (expected a JSON object with it)")
                    if not isinstance(row[text_field], str):
                        raise ValueError(f"{path}:{lineno}: field {text_field!r} is not a string")
                    yield row[text_field]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # installed with the [data] extra

        for text in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist():
            yield text
    else:
        raise ValueError(f"unsupported data file {path} (expected {', '.join(TEXT_SUFFIXES)})")


def stdlib_documents() -> Iterator[str]:
    """The text of every ``*.py`` file of this Python's standard library (``sysconfig`` "stdlib" path), in
    sorted path order; test suites (``test``/``tests``/``idle_test``) and installed packages
    (``site-packages``/``dist-packages``) are left out. Files that are not UTF-8 are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    for f in sorted(root.rglob("*.py")):
        if skip.isdisjoint(f.relative_to(root).parts[:-1]):
            try:
                yield f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue


SOURCES: dict[str, Callable[[DataConfig], Iterable[str]]] = {
    "shakespeare": lambda cfg: read_documents(shipped_corpus()),
    "stdlib": lambda cfg: stdlib_documents(),
    "files": lambda cfg: read_documents(cfg.path, cfg.text_field),
}


# ---------------------------------------------------------------------------------- packing
def pack_documents(docs: Iterable[str], tokenizer, val_fraction: float,
                   val_docs: Iterable[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams (train, val), the end-of-text id after every document.

    Held out: ``val_docs`` when given (all of ``docs`` is then trained on). Otherwise whole documents,
    in the order of the sha256 of their text, until they hold at least ``val_fraction`` of the tokens
    (at least one document, never all): deterministic, independent of file order, and no document loses
    its end (a short question-answer document split inside would never have its answer trained on).
    A single document is the exception: its last ``val_fraction`` of tokens (at least one) is held out.
    Both exceptions to an exact ``val_fraction`` warn: a split inside the document, and whole documents
    holding more than twice ``val_fraction`` (few, long documents: give ``data.val_path``).
    """
    encoded = [(hashlib.sha256(text.encode("utf-8")).digest(), ids) for text in docs if (ids := tokenizer.encode(text))]
    if not encoded:
        raise ValueError("the data source produced no tokens")
    if val_docs is not None:
        train = [ids for _, ids in encoded]
        val = [ids for text in val_docs if (ids := tokenizer.encode(text))]
        if not val:
            raise ValueError("data.val_path produced no tokens")
    elif len(encoded) == 1:
        ids = encoded[0][1]
        cut = len(ids) - max(1, int(len(ids) * val_fraction))
        warnings.warn(f"one document: its last {len(ids) - cut} tokens are held out and never trained on "
                      "(give data.val_path to train on all of it)", stacklevel=2)
        train, val = [ids[:cut]], [ids[cut:]]
    else:
        total = sum(len(ids) for _, ids in encoded)
        held, n_held = set(), 0
        for i in sorted(range(len(encoded)), key=lambda i: encoded[i][0]):
            if n_held >= val_fraction * total or len(held) == len(encoded) - 1:
                break
            held.add(i)
            n_held += len(encoded[i][1])
        if n_held > 2 * val_fraction * total:
            warnings.warn(f"held out {len(held)} of {len(encoded)} whole documents, {n_held / total:.1%} of the "
                          f"tokens (data.val_fraction = {val_fraction}): the documents are few and long; "
                          "give data.val_path for a separate held-out set", stacklevel=2)
        train = [ids for i, (_, ids) in enumerate(encoded) if i not in held]
        val = [ids for i, (_, ids) in enumerate(encoded) if i in held]
    eos = tokenizer.eos_token_id
    return (torch.tensor([t for ids in train for t in (*ids, eos)], dtype=torch.long),
            torch.tensor([t for ids in val for t in (*ids, eos)], dtype=torch.long))


def split_tokens(cfg: DataConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token streams of a local source (not ``hf`` or ``task``): ``pack_documents`` of
    ``SOURCES[cfg.source]``, with ``cfg.val_path``'s documents held out when given."""
    val_docs = read_documents(cfg.val_path, cfg.text_field) if cfg.val_path else None
    return pack_documents(SOURCES[cfg.source](cfg), tokenizer, cfg.val_fraction, val_docs)


class PackedLoader:
    """Deterministic, resumable batches of packed windows from a 1-D token stream.

    Windows of ``seq_len + 1`` tokens; each epoch visits them in a permutation seeded by
    (seed, epoch); every step takes the next ``global_batch`` windows, of which rank r gets rows
    r, r + world, ... (same global batch for any world size).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, global_batch: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        n_windows = (tokens.numel() - 1) // seq_len
        if n_windows < global_batch:
            raise ValueError(f"data has {n_windows} windows of {seq_len + 1} tokens, fewer than one "
                             f"global batch of {global_batch}: use more data or a smaller seq_len/batch")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.n_windows = n_windows
        self.epoch, self.cursor = 0, 0
        self._order_cache: tuple[int, torch.Tensor] | None = None

    def _order(self) -> torch.Tensor:
        """This epoch's window order, drawn once per epoch (a permutation of every window per batch would
        cost the host time proportional to the corpus at every step)."""
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                order = torch.randperm(self.n_windows, generator=g)
            else:
                order = torch.arange(self.n_windows)
            self._order_cache = (self.epoch, order)
        return self._order_cache[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (global_batch / world_size, seq_len)."""
        if self.cursor + self.global_batch > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        idx = self._order()[self.cursor:self.cursor + self.global_batch][self.rank::self.world_size]
        self.cursor += self.global_batch
        starts = idx * self.seq_len
        windows = self.tokens[starts.unsqueeze(1) + torch.arange(self.seq_len + 1)]
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class StreamingLoader:
    """Batches packed on the fly from a streamed Hugging Face dataset (FineWeb-Edu by default).

    The stream is split by rank (``split_dataset_by_node``); the position is the dataset's own
    ``state_dict`` plus the tokens already buffered, so a resumed run continues where it stopped.
    """

    def __init__(self, cfg: DataConfig, tokenizer, batch_size: int, rank: int = 0, world_size: int = 1,
                 data_files: str | None = None):
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        if data_files is not None:  # a local file through the same streaming code path
            ds = load_dataset("json", data_files=data_files, split="train", streaming=True)
        else:
            try:
                ds = load_dataset(cfg.hf_dataset, name=cfg.hf_name, split=cfg.hf_split, streaming=True)
            except ConnectionError as err:
                raise ConnectionError(f"data.source='hf' streams {cfg.hf_dataset!r} from the Hugging Face hub, "
                                      f"which is not reachable ({err}): check the network, or train on "
                                      "data.source='shakespeare' or 'files'") from err
        self.dataset = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.cfg, self.tokenizer, self.batch_size = cfg, tokenizer, batch_size
        self.buffer: list[int] = []
        self._iter: Iterator | None = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.batch_size * (self.cfg.seq_len + 1)
        while len(self.buffer) < need:
            if self._iter is None:
                self._iter = iter(self.dataset)
            try:
                row = next(self._iter)
            except StopIteration:  # next epoch of the stream
                self._iter = None
                self.dataset.set_epoch(getattr(self.dataset, "epoch", 0) + 1)
                continue
            self.buffer += self.tokenizer.encode(row[self.cfg.text_field]) + [self.tokenizer.eos_token_id]
        chunk, self.buffer = self.buffer[:need], self.buffer[need:]
        windows = torch.tensor(chunk, dtype=torch.long).view(self.batch_size, -1)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.buffer = list(state["buffer"])
        self._iter = None


def build_loaders(cfg, tokenizer, rank: int = 0, world_size: int = 1) -> tuple[object, list]:
    """(training loader of this rank, held-out batches) for a run of TrainConfig ``cfg``: packed files / stdlib /
    the shipped corpus, a streamed HF dataset (split world_size + 1 ways: the last shard is held out), or a
    synthetic task.
    Each training micro-batch holds batch_size / grad_accum sequences over all ranks together."""
    micro_batch = cfg.batch_size // cfg.grad_accum
    if cfg.data.source == "task":
        task = build_task(cfg.data.task, cfg.data.task_args)
        if task.seq_len != cfg.data.seq_len or task.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"task {cfg.data.task!r} has seq_len {task.seq_len} and vocab_size {task.vocab_size}: "
                             f"set data.seq_len to it (got {cfg.data.seq_len}) and model.vocab_size >= it "
                             f"(got {cfg.model.vocab_size})")
        by_loops = cfg.data.task_by_loops
        train = TaskLoader(task, micro_batch, cfg.seed,
                           lambda step: cfg.loops.sample(cfg.seed, step) if by_loops else None,
                           cfg.grad_accum, rank, world_size)
        val = TaskLoader(task, cfg.batch_size, cfg.seed + 1, lambda step: cfg.loops.mean if by_loops else None)
        return train, [val.next_batch() for _ in range(cfg.eval_batches)]
    if cfg.data.source == "hf":
        train = StreamingLoader(cfg.data, tokenizer, micro_batch // world_size, rank, world_size + 1)
        val = StreamingLoader(cfg.data, tokenizer, cfg.batch_size, world_size, world_size + 1)
        n_eval = cfg.eval_batches
    else:
        train_tokens, val_tokens = split_tokens(cfg.data, tokenizer)
        train = PackedLoader(train_tokens, cfg.data.seq_len, micro_batch, cfg.seed, rank, world_size)
        n_val = (val_tokens.numel() - 1) // cfg.data.seq_len
        if n_val < 1:
            raise ValueError(f"held-out split has fewer than seq_len+1={cfg.data.seq_len + 1} tokens: "
                             "raise data.val_fraction or use more data")
        val = PackedLoader(val_tokens, cfg.data.seq_len, min(cfg.batch_size, n_val), shuffle=False)
        n_eval = min(cfg.eval_batches, val.n_windows // val.global_batch)
    return train, [val.next_batch() for _ in range(n_eval)]
