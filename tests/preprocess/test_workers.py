"""The processes of a run (mtdpo/preprocess/workers.py, issue 29): workers never outlive the main
process, SIGTERM ends a run as Ctrl-C does (exit 143, nothing left behind), and --num-proc is
capped by the CPUs and by the chunks there are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from helpers import hidden_leftovers, invoke, run_preprocess, sample_rows, write_jsonl

from mtdpo.preprocess import pipeline
from mtdpo.synthetic import make_pairs

PYTHON_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def workers_of(pid: int) -> list[int]:
    """Live processes forked by `pid` with its command line: its workers, not multiprocessing's
    resource tracker (a child too, with a command line of its own)."""
    command = cmdline(pid)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (state := process_state(int(entry.name))) and state[1] == pid:
            if cmdline(int(entry.name)) == command:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid), or None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def gone(pid: int) -> bool:
    state = process_state(pid)
    return state is None or state[0] in "ZX"  # a zombie has exited; only its exit status is left


def start_with_workers(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """`mtdpo preprocess --num-proc 2` on enough rows to be busy, once both workers are working.
    Its output goes to files, not pipes: orphaned workers would hold a pipe open forever."""
    source = write_jsonl(tmp_path / "rows.jsonl", list(make_pairs(6000, seed=4)))
    command = [sys.executable, "-m", "mtdpo", "preprocess", str(source), "--out", str(tmp_path / "cache")]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([*command, "--num-proc", "2", "-q"], env=PYTHON_ENV, stdout=out, stderr=err)
    deadline = time.monotonic() + 120
    while len(workers := workers_of(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
        time.sleep(0.05)
    time.sleep(1)  # both have chunks in hand
    return proc, workers


def left_alive(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive after `seconds`, killed (a failing test leaves nothing running)."""
    deadline = time.monotonic() + seconds
    while (alive := [p for p in pids if not gone(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return alive


@pytest.mark.slow
def test_workers_exit_when_the_main_process_is_killed(tmp_path):
    """Before, each worker lived on (parent 1, ~280 MB) after a SIGKILL of the main process."""
    proc, workers = start_with_workers(tmp_path)
    proc.kill()
    proc.wait(60)
    assert left_alive(workers, 10) == []
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_sigterm_ends_a_run_with_workers_cleanly(tmp_path):
    """SIGTERM to the main process: exit 143 with one line, workers gone, no temporary directory."""
    proc, workers = start_with_workers(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert left_alive(workers, 10) == []
    assert proc.returncode == 143
    assert (tmp_path / "stdout").read_text() == ""
    assert (tmp_path / "stderr").read_text() == "preprocess stopped by SIGTERM; no cache written\n"
    assert not (tmp_path / "cache").exists()
    assert hidden_leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "stderr", "stdout"]


class Stopped(Exception):
    """What this test's own SIGTERM handler raises, were preprocess to leave SIGTERM to it."""


def test_sigterm_during_a_run_removes_the_temporary_directory_and_exits_143(tmp_path, monkeypatch):
    """In-process: the run signals itself after its first chunk; the command says so and exits 143."""
    process_chunk = pipeline.process_chunk
    chunks = []

    def signalling(chunk):
        chunks.append(len(chunk))
        if len(chunks) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return process_chunk(chunk)

    def outside(signum, frame):
        raise Stopped

    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 64)
    monkeypatch.setattr(pipeline, "process_chunk", signalling)
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        result = invoke("preprocess", write_jsonl(tmp_path / "rows.jsonl", sample_rows()), "--out", tmp_path / "cache")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143, result.output
    assert result.stderr == "preprocess stopped by SIGTERM; no cache written\n"
    assert chunks == [64, 64]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_sigterm_handling_ends_with_the_run(tmp_path):
    """preprocess() handles SIGTERM only while it runs: a library caller's handler comes back."""
    before = signal.getsignal(signal.SIGTERM)
    run_preprocess(write_jsonl(tmp_path / "rows.jsonl", sample_rows(2)), tmp_path / "cache")
    assert signal.getsignal(signal.SIGTERM) is before


# ── how many workers ──────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "cpus, note",
    [(2, "note: --num-proc 100000 capped to 2 (2 CPUs available)"),
     (8, "note: --num-proc 100000 capped to 3 (the input makes 3 chunks of 256 rows)")],
)  # fmt: skip
def test_num_proc_is_capped_by_cpus_and_chunks(tmp_path, monkeypatch, cpus, note):
    """Before, --num-proc 100000 forked about 3,900 processes. 600 rows are 3 chunks of 256."""
    pools, start = [], ProcessPoolExecutor.__init__

    def recording(self, max_workers=None, *args, **kwargs):
        pools.append(max_workers)
        if max_workers > 8:  # before any process is forked
            raise AssertionError(f"a pool of {max_workers} workers")
        start(self, max_workers, *args, **kwargs)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(ProcessPoolExecutor, "__init__", recording)
    rows = write_jsonl(tmp_path / "rows.jsonl", list(make_pairs(600, seed=1)))
    result = invoke("preprocess", rows, "--out", tmp_path / "cache", "--num-proc", 100000)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [note]
    assert pools == [min(cpus, 3)]
    assert run_preprocess(rows, tmp_path / "one")["kept"] == 600
    assert (tmp_path / "one" / "data-00000-of-00001.arrow").read_bytes() == (
        tmp_path / "cache" / "data-00000-of-00001.arrow"
    ).read_bytes()
