"""Every shell and Python block of README.md and docs/*.md runs as written, as a new user runs it.

The blocks of one file run in order, in one scratch directory and one Python namespace (a reader's
session). A marker on the line before a block changes how it runs:

    <!-- doc-test: skip REASON -->     not run (needs a GPU, the network, ...): reported as a skip with REASON
    <!-- doc-test: install REASON -->  install lines: .ci/run installs; the other commands of the block run
                                       here once per session (the README's train command: ``trained_run``)
    <!-- doc-test: server -->          starts a server in the background (``... &``): the test starts it, waits
                                       for /health and stops it after the file's last block (it is also
                                       killed after SERVER_LIFETIME seconds whatever happens)

Every scratch directory sees ``runs/shakespeare-tiny/``: the run that the README's first command
trained, verbatim, once per session (``MYTHOS_DOCS_RUN=DIR`` reuses ``DIR/runs/shakespeare-tiny``
instead: a shortcut for editing docs; CI trains). Fenced blocks without a language hold no commands (checked).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]
RUN = "runs/shakespeare-tiny"           # what the README's first command writes
SERVER_URL = "http://127.0.0.1:8000"    # where `mythos serve` listens by default
SERVER_LIFETIME = 600                   # seconds: a doc server never outlives this
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- doc-test: (skip|install|server)\b\s*(.*?)\s*-->")
COMMANDS = ("mythos", "pip", "python", "curl", "torchrun", "git")


@dataclass
class Block:
    file: str
    line: int
    lang: str
    code: str
    marker: str = ""
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def read_blocks(name: str) -> list[Block]:
    text = (ROOT / name).read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        out.append(Block(name, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2),
                         *(marker.groups() if marker else ())))
    return out


BLOCKS = [b for name in FILES for b in read_blocks(name) if b.lang in ("bash", "python")]
LAST_OF_FILE = {b.file: b.id for b in BLOCKS}


def commands(block: Block) -> list[str]:
    """The commands of a shell block, one per ``&&``-separated part, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block.code)
    return [part.strip() for line in joined.splitlines() for part in line.split("#")[0].split("&&") if part.strip()]


def shell_env(bin_dir: Path) -> dict[str, str]:
    """This checkout's code first, and ``python`` = this interpreter (as in a virtual environment)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]]), MPLBACKEND="Agg")
    return env


@pytest.fixture(scope="session")
def bin_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bin")
    (d / "python").symlink_to(sys.executable)
    for name, module in (("mythos", "open_mythos.cli"), ("mythos-lm-eval", "open_mythos.eval.harness")):
        if shutil.which(name) is None:  # not installed (a checkout on PYTHONPATH): the entry point by hand
            (d / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "from {module} import main; '
                                  f'import sys; sys.exit(main())" "$@"\n')
            (d / name).chmod(0o755)
    return d


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, bin_dir) -> Path:
    """Run the non-install commands of the README's install block, verbatim (the shakespeare-tiny
    preset: ~1 min on 2 cores); return the scratch directory that holds ``runs/shakespeare-tiny``."""
    if os.environ.get("MYTHOS_DOCS_RUN"):  # a developer's shortcut: a directory that already holds the run
        return Path(os.environ["MYTHOS_DOCS_RUN"]).resolve()
    block = next(b for b in BLOCKS if b.marker == "install")
    base = tmp_path_factory.mktemp("readme-run")
    for cmd in commands(block):
        if cmd.startswith("pip install") or cmd == "python -m pytest":  # .ci/run does these
            continue
        out = subprocess.run(["bash", "-c", cmd], cwd=base, env=shell_env(bin_dir), capture_output=True, text=True,
                             timeout=1800)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert (base / RUN / "model" / "model.safetensors").is_file()
    return base


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """One reader's session per file: scratch directory, Python namespace, background server."""
    state: dict[str, dict] = {}
    yield state
    for session in state.values():
        stop_server(session)


def session_for(block: Block, sessions: dict, tmp_path_factory, request) -> dict:
    if block.file not in sessions:
        directory = tmp_path_factory.mktemp(re.sub(r"\W", "-", block.file))
        if RUN in (ROOT / block.file).read_text():
            (directory / "runs").mkdir()
            (directory / RUN).symlink_to(request.getfixturevalue("trained_run") / RUN)
        sessions[block.file] = {"dir": directory, "ns": {"__name__": "__doc__"}, "server": None}
    return sessions[block.file]


def port_in_use(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


def start_server(block: Block, session: dict, env: dict) -> None:
    code = block.code.strip()
    assert code.endswith("&"), f"{block.id}: a server block starts the server in the background ('... &')"
    if port_in_use(SERVER_URL):
        session["server"] = "busy"
        pytest.skip(f"{SERVER_URL} is in use by another process: the doc's server cannot start")
    log = open(session["dir"] / "server.log", "w")
    proc = subprocess.Popen(["timeout", str(SERVER_LIFETIME), "bash", "-c", code.rstrip("&").strip()],
                            cwd=session["dir"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    session["server"] = proc
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{block.id}: the server exited:\n{(session['dir'] / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{SERVER_URL}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"{block.id}: the server did not answer /health within 300 s")


def stop_server(session: dict) -> None:
    proc = session.get("server")
    if isinstance(proc, subprocess.Popen) and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    session["server"] = None


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block_runs(block, sessions, tmp_path_factory, request, bin_dir, monkeypatch):
    try:
        run_block(block, sessions, tmp_path_factory, request, bin_dir, monkeypatch)
    finally:
        if block.id == LAST_OF_FILE[block.file] and block.file in sessions:
            stop_server(sessions[block.file])


def run_block(block, sessions, tmp_path_factory, request, bin_dir, monkeypatch) -> None:
    if block.marker == "skip":
        pytest.skip(f"marked in the doc: {block.note}")
    if block.marker == "install":
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        for cmd in commands(block):
            for extra in re.findall(r"\.\[(\w+)\]", cmd):
                assert extra in extras, f"{block.id}: pyproject.toml has no [{extra}] extra"
        assert (request.getfixturevalue("trained_run") / RUN / "sweep.json").is_file()
        return
    session = session_for(block, sessions, tmp_path_factory, request)
    env = shell_env(bin_dir)
    if block.marker == "server":
        start_server(block, session, env)
        return
    if "localhost:8000" in block.code and not isinstance(session["server"], subprocess.Popen):
        pytest.skip("needs the server that an earlier block of this file starts")
    if block.lang == "python":
        monkeypatch.chdir(session["dir"])
        monkeypatch.setenv("MPLBACKEND", "Agg")
        monkeypatch.syspath_prepend(str(session["dir"]))
        exec(compile(block.code, block.id, "exec"), session["ns"])
        return
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=session["dir"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{block.id} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


@pytest.mark.parametrize("name", FILES)
def test_untagged_blocks_hold_no_commands(name):
    """A fenced block that a reader would type is tagged bash or python, so the test above runs it."""
    for block in read_blocks(name):
        if block.lang in ("", "text"):
            first = block.code.lstrip().split(maxsplit=1)[0] if block.code.strip() else ""
            assert first not in COMMANDS, f"{block.id}: tag this block ```bash (or python) so it is tested"
