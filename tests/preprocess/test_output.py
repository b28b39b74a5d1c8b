"""Where stage one writes (mtdpo/cache/output.py, issue 29): --overwrite replaces only an mtdpo
cache, never the input or a folder around it; one run per output at a time; an --out that cannot
be written is one line before any work, a write that fails on the way (a full disk) is one line and
leaves the old cache intact; a run that keeps nothing leaves its rejects beside the output."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import assert_user_error, hidden_leftovers, invoke, run_preprocess, sample_rows, write_jsonl

from mtdpo.assets import SAMPLE_DATA
from mtdpo.cache.output import output_lock
from mtdpo.errors import Interrupted, UsageError
from mtdpo.preprocess import pipeline
from mtdpo.synthetic import make_pairs

PYTHON_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """The issue's repro: proj/ holds the input and someone's notes; commands run from tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj").mkdir()
    shutil.copy(SAMPLE_DATA, tmp_path / "proj" / "sample.jsonl")
    (tmp_path / "proj" / "notes.txt").write_text("notes\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("a,b\n")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text('{"schema_version": 1')
    return tmp_path


# ── --overwrite and what --out may name ───────────────────────────────────────

REFUSED = {
    "the folder holding the input": (
        ["proj/sample.jsonl", "--out", "proj", "--overwrite"],
        "--out proj is or holds the input proj/sample.jsonl; choose another --out",
    ),
    "the input itself": (
        ["proj/sample.jsonl", "--out", "proj/sample.jsonl", "--overwrite"],
        "--out proj/sample.jsonl is or holds the input proj/sample.jsonl; choose another --out",
    ),
    "the same folder spelled another way": (
        ["proj/sample.jsonl", "--out", "results/../proj", "--overwrite"],
        "--out results/../proj is or holds the input proj/sample.jsonl; choose another --out",
    ),
    "a folder inside a directory input": (
        ["proj", "--out", "proj/cache"],
        "--out proj/cache is inside the input directory proj; choose another --out",
    ),
    "a file": (
        ["proj/sample.jsonl", "--out", "proj/notes.txt", "--overwrite"],
        "--overwrite replaces only an mtdpo cache, and proj/notes.txt is not one (it is a file); "
        "nothing was changed: remove it yourself or choose another --out",
    ),
    "a folder that is not a cache": (
        ["proj/sample.jsonl", "--out", "results", "--overwrite"],
        "--overwrite replaces only an mtdpo cache, and results is not one (it has no manifest.json); "
        "nothing was changed: remove it yourself or choose another --out",
    ),
    "a folder whose manifest.json is not a cache's": (
        ["proj/sample.jsonl", "--out", "old", "--overwrite"],
        "--overwrite replaces only an mtdpo cache, and old is not one (old/manifest.json is corrupt: "
        "Expecting ',' delimiter: line 1 column 21 (char 20)); nothing was changed: remove it yourself or choose another --out",
    ),
    "the current directory": (
        ["proj/sample.jsonl", "--out", ".", "--overwrite"],
        "--out . is the current directory or one above it; name the cache's own directory, e.g. data_cache/NAME",
    ),
    "the parent directory": (
        ["proj/sample.jsonl", "--out", "..", "--overwrite"],
        "--out .. is the current directory or one above it; name the cache's own directory, e.g. data_cache/NAME",
    ),
    "a place under a file": (
        ["proj/sample.jsonl", "--out", "proj/notes.txt/cache"],
        "cannot write --out proj/notes.txt/cache: proj/notes.txt is a file, not a directory",
    ),
}


@pytest.mark.parametrize("args, message", list(REFUSED.values()), ids=list(REFUSED))
def test_overwrite_replaces_only_a_cache_and_never_the_input(project, args, message):
    """Before: `--out proj --overwrite` deleted the input and the notes (exit 0), `--out` the
    input file replaced it, `--out ..` failed after tokenising everything with a traceback."""
    before = files_under(project)
    assert_user_error(invoke("preprocess", *args, "-q"), message)
    assert files_under(project) == before  # nothing deleted, nothing left behind


# ── one run per output ────────────────────────────────────────────────────────


def hold_lock(out: Path, held, release) -> None:
    with output_lock(out):
        held.set()
        release.wait(60)


def test_a_second_run_into_a_locked_output_stops_naming_the_first(tmp_path):
    """Another process holds the output: the run stops at once, says which process, writes nothing."""
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    out = tmp_path / "cache"
    holder = context.Process(target=hold_lock, args=(out, held, release))
    holder.start()
    try:
        assert held.wait(60)
        with pytest.raises(UsageError) as err:
            run_preprocess(SAMPLE_DATA, out)
        assert str(err.value) == (
            f"{out} is being written by another mtdpo run (pid {holder.pid}); wait for it to finish or choose another --out"
        )
        assert not out.exists()
    finally:
        release.set()
        holder.join(60)
    run_preprocess(SAMPLE_DATA, out)  # the lock went with its holder
    assert hidden_leftovers(tmp_path) == []


def mtdpo(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mtdpo", *map(str, args)],
        env=PYTHON_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_runs_into_one_output_at_once(tmp_path):
    """The issue's repro: a 4,000-row run and a 40-row run started a second apart into one --out.
    Before, both exited 0. Now one succeeds, the other names it, and the cache holds the winner's rows."""
    big = write_jsonl(tmp_path / "big.jsonl", list(make_pairs(4000, seed=1)))
    small = write_jsonl(tmp_path / "small.jsonl", list(make_pairs(40, seed=2)))
    out = tmp_path / "cache"
    first = mtdpo("preprocess", big, "--out", out, "-q")
    while not (tmp_path / ".cache-mtdpo.lock").exists():
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    time.sleep(1)
    second = mtdpo("preprocess", small, "--out", out, "-q")
    (_, first_err), (_, second_err) = first.communicate(timeout=600), second.communicate(timeout=600)
    assert (first.returncode, second.returncode) == (0, 2), (first_err, second_err)
    assert second_err == (
        f"error: {out} is being written by another mtdpo run (pid {first.pid}); "
        "wait for it to finish or choose another --out\n"
    )
    assert json.loads((out / "manifest.json").read_text())["counts"]["kept"] == 4000
    assert hidden_leftovers(tmp_path) == []


# ── a place that cannot be written, a full disk ───────────────────────────────


def test_a_read_only_file_system_is_refused_before_any_work(tmp_path, monkeypatch):
    statvfs = os.statvfs

    def read_only(path):
        real = statvfs(path)
        if Path(path).resolve() == tmp_path.resolve():
            return os.statvfs_result((*real[:8], real.f_flag | os.ST_RDONLY, real.f_namemax))
        return real

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer is loaded only once the output is known to be writable")

    monkeypatch.setattr(os, "statvfs", read_only)
    monkeypatch.setattr(pipeline, "load_tokenizer", no_tokenizer)
    with pytest.raises(UsageError) as err:
        run_preprocess(SAMPLE_DATA, tmp_path / "cache")
    assert str(err.value) == f"cannot write --out {tmp_path / 'cache'}: {tmp_path} is on a read-only file system"


def test_too_little_free_space_is_refused_before_any_work(tmp_path, monkeypatch):
    """The estimate is low on purpose (half the input's bytes): only a run that cannot fit is refused."""

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer is loaded only once the output is known to fit")

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    monkeypatch.setattr(pipeline, "load_tokenizer", no_tokenizer)
    with pytest.raises(UsageError) as err:
        run_preprocess(SAMPLE_DATA, tmp_path / "cache")
    needed = SAMPLE_DATA.stat().st_size // 2
    assert str(err.value) == (
        f"no space left for --out {tmp_path / 'cache'}: {tmp_path} has 1.0 kB free, the cache needs about "
        f"{needed / 1000:,.1f} kB; free some space or choose another --out"
    )
    assert hidden_leftovers(tmp_path) == []


FAILURES = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EDQUOT: "disk quota exceeded",
}


@pytest.mark.parametrize("code", list(FAILURES), ids=[errno.errorcode[c] for c in FAILURES])
def test_a_write_that_fails_is_one_line_and_the_old_cache_stays(tmp_path, monkeypatch, code):
    """Disk full (or the directory turned read-only) while the shards are written: before, a
    47-69-line traceback. The previous cache is byte-for-byte what it was, nothing is left behind."""
    from datasets.arrow_writer import ArrowWriter

    out = tmp_path / "cache"
    assert invoke("preprocess", write_jsonl(tmp_path / "old.jsonl", sample_rows(5)), "--out", out, "-q").exit_code == 0
    before = files_under(out)

    def failing_write(self, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ArrowWriter, "write_table", failing_write)
    result = invoke("preprocess", SAMPLE_DATA, "--out", out, "--overwrite", "-q")
    assert_user_error(result, f"cannot write --out {out}: {FAILURES[code]}; {out} is unchanged")
    assert files_under(out) == before
    assert hidden_leftovers(tmp_path) == []


def test_a_shard_that_cannot_be_created_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """The disk is full before the first shard file exists (the writer is still starting)."""
    from datasets.arrow_writer import ArrowWriter

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(kwargs.get("path")))

    monkeypatch.setattr(ArrowWriter, "__init__", no_space)
    out = tmp_path / "cache"
    with pytest.raises(UsageError) as err:
        run_preprocess(SAMPLE_DATA, out)
    shard = tmp_path / f".cache.incomplete-{os.getpid()}" / "data-00000.arrow"
    assert str(err.value) == f"cannot write --out {out}: no space left on the device ({shard}); no cache written"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_directory_without_write_permission_is_one_line(tmp_path):
    """Permissions: root writes anywhere, so as root the command runs without CAP_DAC_OVERRIDE."""
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    command = [sys.executable, "-m", "mtdpo", "preprocess", str(SAMPLE_DATA), "--out", str(locked / "cache")]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a directory unwritable")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *command]
    proc = subprocess.run(command, capture_output=True, text=True, env=PYTHON_ENV, timeout=300)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"error: cannot write --out {locked / 'cache'}: permission denied in {locked}\n"
    assert list(locked.iterdir()) == []


# ── the rename that replaces a cache ──────────────────────────────────────────


def test_a_cache_moved_aside_by_a_run_killed_while_renaming_is_put_back(tmp_path):
    """A run killed (SIGKILL, power cut) between moving the old cache aside and renaming the new
    one into place left the old cache as .NAME.old-PID: before, the next run deleted it as a
    leftover. Now it is put back, and a run without --overwrite leaves it alone."""
    out = tmp_path / "cache"
    run_preprocess(write_jsonl(tmp_path / "old.jsonl", sample_rows(3)), out)
    before = files_under(out)
    out.rename(tmp_path / ".cache.old-999999999")  # no such process
    with pytest.raises(UsageError, match="already exists; pass --overwrite to replace it$"):
        run_preprocess(SAMPLE_DATA, out)
    assert files_under(out) == before and hidden_leftovers(tmp_path) == []


class Stopped(Exception):
    """What this test's own SIGTERM handler raises, were preprocess to leave SIGTERM to it."""


def test_sigterm_while_the_cache_is_renamed_into_place_waits_for_both_renames(tmp_path, monkeypatch):
    """Between moving the old cache aside and renaming the new one in, there is no cache at --out:
    a SIGTERM that lands there is delivered after the second rename, never between the two."""
    out = tmp_path / "cache"
    run_preprocess(write_jsonl(tmp_path / "old.jsonl", sample_rows(3)), out)
    rename = Path.rename

    def signalling_rename(self, target):
        if self == out:  # the old cache moved aside: the first of the two renames
            os.kill(os.getpid(), signal.SIGTERM)
        return rename(self, target)

    def outside(signum, frame):
        raise Stopped

    monkeypatch.setattr(Path, "rename", signalling_rename)
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        with pytest.raises((Interrupted, Stopped)):
            run_preprocess(SAMPLE_DATA, out, overwrite=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert json.loads((out / "manifest.json").read_text())["counts"]["kept"] == 240  # the new cache, whole
    assert hidden_leftovers(tmp_path) == []


# ── a run that keeps nothing ──────────────────────────────────────────────────


def test_a_run_that_keeps_nothing_leaves_its_rejects_beside_the_output(tmp_path):
    """Before, the rejects were lost with the temporary directory: only the error line said why."""
    source = write_jsonl(tmp_path / "bad.jsonl", ["{broken", "[]", {"chosen": "x"}])
    out = tmp_path / "cache"
    result = invoke("preprocess", source, "--out", out)
    assert result.exit_code == 2 and result.stdout.strip() == "" and "Traceback" not in result.output
    *table, error = result.stderr.strip().splitlines()
    rejects = tmp_path / "cache.rejects.jsonl"
    assert error == (
        f"error: {source}: kept 0 of 3 rows (1 invalid JSON, 1 row is a list, expected a JSON object, "
        f"1 missing key 'rejected' (row keys: ['chosen'])); no cache written; the rejects are in {rejects}"
    )
    cells = dict([c.strip() for c in line.split("│")[1:-1]] for line in table if line.count("│") == 3)
    assert (cells["rows"], cells["kept"], cells["rejected"], cells["invalid JSON"]) == ("3", "0", "3", "1")
    assert [json.loads(line)["row"] for line in rejects.read_text().splitlines()] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "cache.rejects.jsonl"]


# ── options ───────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("size", ["-5MB", "0MB"])
def test_a_shard_size_of_zero_or_less_is_refused(tmp_path, size):
    assert_user_error(
        invoke("preprocess", SAMPLE_DATA, "--out", tmp_path / "cache", "--max-shard-size", size),
        f"--max-shard-size '{size}': a shard must hold more than 0 bytes, e.g. 500MB",
    )
    assert list(tmp_path.iterdir()) == []
