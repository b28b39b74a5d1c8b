"""The files of a cache directory, below the records: atomic directory writes, the files
`datasets.load_from_disk` reads, and checksums with the stamp that spares re-hashing them.

Nothing in a cache is executed or unpickled: manifest.json, state.json and checksums.json are
JSON, the shards are Arrow IPC streams. Every problem is a UsageError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from mtdpo import compat
from mtdpo.errors import UsageError
from mtdpo.fingerprint import sha256_file, sha256_text

CHECKSUMS = "checksums.json"  # sizes and SHA-256 of the shards and CHECKED_FILES
# Plus every data-*.arrow shard and, in a cache, manifest.json and the tokenizer copy (writer.py).
# Not state.json: its fingerprint is derived from checksums.json (and it is parsed on load anyway).
# Not verified.json either: it only spares re-hashing, and --verify-cache re-hashes regardless.
CHECKED_FILES = ("dataset_info.json",)
# Size and modification time of those files when their SHA-256 last matched checksums.json: a run
# re-hashes only files that changed since (start-up does not grow with the data).
STAMP = "verified.json"
# Siblings a run writes before renaming into place (.NAME.incomplete-PID …): never a cache.
TEMPORARY_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>incomplete|parts|old|ref)-(?P<pid>\d+)$")


# ── writing a directory atomically ────────────────────────────────────────────


@contextlib.contextmanager
def writing(out: Path, kind: str = "incomplete") -> Iterator[Path]:
    """Write a directory atomically: yields an empty temporary sibling of `out` (.NAME.KIND-PID),
    which replaces `out` only if the block finishes; on any error it is removed and `out` is
    left as it was. Siblings of killed runs (their PID gone) are cleared first."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{kind}-{os.getpid()}")
    remove_stale_runs(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename a finished directory into place; an old one at `out` goes only then."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    with signals_held():  # between the two renames there is no `out`; then the old one is left over
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done: they are noted, and raised again right
    after it. (A signal mask would not do: Python runs its handlers in the main thread whichever
    thread the kernel delivers a signal to.) Python handlers live in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: handler for s, handler in previous.items() if handler is not None}  # None: not Python's to set
    for s in previous:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in received:
            signal.raise_signal(s)


def remove_stale_runs(out: Path) -> list[Path]:
    """Delete the temporary siblings of `out` left by runs that were killed (their PID is gone).
    But a run killed between the two renames of `replace_dir` (SIGKILL, a power cut) left the
    previous `out` whole as .NAME.old-PID and no `out`: that one is put back."""
    out, removed = Path(out), []
    for sibling in sorted(out.parent.glob(f".{out.name}.*-*")):
        match = TEMPORARY_DIR.match(sibling.name)
        if match and match["name"] == out.name and not _alive(int(match["pid"])):
            if match["kind"] == "old" and not (out.exists() or out.is_symlink()):
                sibling.rename(out)
                continue
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_json(path: Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old file or
    the new one, never half of one."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is corrupt: {err}") from None


# ── what datasets reads ───────────────────────────────────────────────────────


def write_dataset_files(directory: Path, shards: list[str], features, extra: list[str] = ()) -> None:
    """What `datasets.load_from_disk` reads besides the shards (dataset_info.json and state.json,
    as `save_to_disk` writes them), and checksums.json (of the shards, those files and `extra`
    files of the cache). The state's fingerprint is derived from the checksums, so writing the
    same rows twice gives byte-equal files."""
    info = compat.dataset_info_dict(features)
    (directory / "dataset_info.json").write_text(json.dumps({key: info[key] for key in sorted(info)}, indent=2))
    write_checksums(directory, [*shards, *extra])
    state = {
        "_data_files": [{"filename": name} for name in shards],
        "_fingerprint": sha256_text((directory / CHECKSUMS).read_text())[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def shard_files(directory: Path) -> list[Path]:
    """The Arrow files listed in state.json, each checked to exist."""
    state = read_json(Path(directory) / "state.json")
    try:
        names = [entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError):
        raise UsageError(f"{Path(directory) / 'state.json'} is corrupt: it lists no _data_files") from None
    shards = [Path(directory) / name for name in names]
    for shard in shards:
        if not shard.is_file():
            raise UsageError(f"shard {shard} is missing")
    return shards


def check_shard(shard: Path) -> None:
    """See that a shard reads to its end (memory-mapped: the record-batch headers only)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(shard)) as source:
            pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise UsageError(f"shard {shard} is truncated or corrupt ({err})".splitlines()[0]) from None


# ── checksums ─────────────────────────────────────────────────────────────────


def write_checksums(directory: Path, files: list[str]) -> None:
    """Record size and SHA-256 of the shards (and other data files) and datasets' JSON files."""
    names = [*sorted(files), *CHECKED_FILES]
    sums = {name: _entry(Path(directory) / name) for name in names}
    (Path(directory) / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n")
    write_stamp(directory)


def _entry(file: Path) -> dict:
    return {"bytes": file.stat().st_size, "sha256": sha256_file(file)}


def record_checksums(cache: Path, names: list[str], replacing: str | None = None) -> None:
    """Record the size and SHA-256 of the files `names` of a cache in its checksums.json (replaced
    atomically), dropping first the entries under the folder `replacing` (rewritten whole)."""
    sums = read_json(Path(cache) / CHECKSUMS)
    if replacing:
        sums = {name: entry for name, entry in sums.items() if not name.startswith(f"{replacing}/")}
    sums.update({name: _entry(Path(cache) / name) for name in names})
    replace_file(Path(cache) / CHECKSUMS, json.dumps(sums, indent=2) + "\n")
    write_stamp(cache)


def check_files(cache: Path, rehash: bool) -> None:
    """Compare the files' sizes with checksums.json (absent in caches rewritten by other tools:
    skipped) and, if `rehash`, their SHA-256, stamping the files as verified when all agree."""
    path = Path(cache) / CHECKSUMS
    if not path.is_file():
        return
    sums = read_json(path)
    for name, expected in sums.items():
        file = Path(cache) / name
        if not file.is_file():
            raise UsageError(f"{file} is missing (listed in {CHECKSUMS})")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise UsageError(f"{file} is truncated or changed: {size:,} bytes, {CHECKSUMS} says {expected['bytes']:,}")
    if not rehash:
        return
    for name, expected in sums.items():
        if sha256_file(Path(cache) / name) != expected["sha256"]:
            raise UsageError(f"{Path(cache) / name} is corrupt: its SHA-256 differs from the one in {CHECKSUMS}")
    write_stamp(cache)


def write_stamp(cache: Path) -> None:
    """Note that the files, as they are now, match checksums.json (best effort: a read-only
    cache is simply verified in full at every start)."""
    tmp = Path(cache) / f".{STAMP}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(_stamp(cache), indent=2) + "\n")
        tmp.replace(Path(cache) / STAMP)  # atomic: ranks of one job may stamp the same cache at once
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _stamp(cache: Path) -> dict:
    """What changes when a file is rewritten: its size and modification time, and checksums.json."""
    stats = {name: Path(cache, name).stat() for name in [CHECKSUMS, *read_json(Path(cache) / CHECKSUMS)]}
    return {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}


def as_verified(cache: Path) -> bool:
    """Whether every file has the size and modification time it had when its SHA-256 was last
    checked (stat calls only)."""
    try:
        return _stamp(cache) == _read_stamp(cache)
    except (OSError, UsageError):  # no checksums.json, or a listed file is gone: check_files says which
        return False


def _read_stamp(cache: Path) -> dict | None:
    try:
        return json.loads((Path(cache) / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no stamp or a damaged one: verify in full
