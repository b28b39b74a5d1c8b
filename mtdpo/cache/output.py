"""Where a cache may be written, and by whom: nothing the user did not name as a cache is replaced.

    check_output_path(out, inputs)    before any work: a name of its own, not the input nor around
                                      it, a writable directory to go in
    check_free_space(out, needed)     before any work: room for a low estimate of the cache
    output_lock(out)                  one run per output at a time, held for the whole run
    check_replaceable(out, overwrite) an existing `out` goes only with --overwrite, and only if
                                      its manifest.json says it is an mtdpo cache
    write_errors(out)                 a full disk, a read-only or forbidden directory: one line

Paths are compared resolved, so `proj/../proj` and a symlink name the same directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mtdpo.cache.manifest import MANIFEST, Manifest
from mtdpo.errors import UsageError

# Why a write failed, in words, for the errors a user can do something about.
WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}

# flock's errors on a file system that has no locks.
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


# ── before any work ───────────────────────────────────────────────────────────


def check_output_path(out: Path, inputs: list[Path]) -> None:
    """Refuse an `out` that cannot be a cache's own directory: the current directory or one above
    it, the input or a directory holding it, a directory inside a directory input, or a place
    under a file or where nothing may be written."""
    out = Path(out)
    resolved = out.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UsageError(
            f"--out {out} is the current directory or one above it; name the cache's own directory, "
            "e.g. data_cache/NAME"
        )
    for given in inputs:
        source = Path(given).resolve()
        if source == resolved or resolved in source.parents:
            raise UsageError(f"--out {out} is or holds the input {given}; choose another --out")
        if source.is_dir() and source in resolved.parents:
            raise UsageError(f"--out {out} is inside the input directory {given}; choose another --out")
    check_writable_parent(out)


def check_writable_parent(out: Path) -> None:
    """The nearest existing directory above `out` (the run creates the ones missing) must be a
    directory this process may write in."""
    base = existing_ancestor(out)
    if not base.is_dir():
        raise UsageError(f"cannot write --out {out}: {base} is a file, not a directory")
    if os.statvfs(base).f_flag & os.ST_RDONLY:
        raise UsageError(f"cannot write --out {out}: {base} is on a read-only file system")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write --out {out}: permission denied in {base}")


def existing_ancestor(out: Path) -> Path:
    """`out`'s parent, or the nearest directory above it that exists."""
    base = Path(out).parent
    while not base.exists() and base != base.parent:
        base = base.parent
    return base


def check_free_space(out: Path, needed: int) -> None:
    """Refuse a run that cannot fit: `needed` is a low estimate of the cache's bytes."""
    base = existing_ancestor(out)
    free = shutil.disk_usage(base).free
    if free < needed:
        raise UsageError(
            f"no space left for --out {out}: {base} has {_size(free)} free, the cache needs about {_size(needed)}; "
            "free some space or choose another --out"
        )


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"


# ── one run per output ────────────────────────────────────────────────────────


def lock_path(out: Path) -> Path:
    """The lock file beside `out`. Its name does not start with `.NAME.`, the prefix of the run's
    temporary directories, which are refused by that name as unfinished runs."""
    return Path(out).with_name(f".{Path(out).name}-mtdpo.lock")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock beside `out` for the whole run, so two runs never write one output:
    the second stops at once, naming the process that holds it. The kernel releases the lock when
    the holder dies, however it dies; the file is removed at the end of the run, and so are the
    directories made for it if the run left them empty (it failed)."""
    path = lock_path(out)
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # deepest first
    with write_errors(out):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _locked(path, out)
    try:
        with write_errors(out):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before closing: a run waiting on this file sees it was replaced
        os.close(fd)
        for directory in made:
            with contextlib.suppress(OSError):  # not empty: it holds the new cache, or someone else's files
                directory.rmdir()


def _locked(path: Path, out: Path) -> int:
    """An open descriptor of `path` holding its lock. A run that finished removed the file it
    locked: a descriptor of that removed file locks nothing, so the new file is locked instead."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(
                f"{out} is being written by another mtdpo run (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        except OSError as err:
            if err.errno not in NO_LOCKS:
                os.close(fd)
                raise
            return fd  # a file system without locks (some network mounts): the run goes on unguarded
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


# ── an existing output ────────────────────────────────────────────────────────


def check_replaceable(out: Path, overwrite: bool) -> None:
    """An existing `out` is replaced only with --overwrite, and only if it is an mtdpo cache:
    never a file, a project folder or a dataset that happens to be named by --out."""
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise UsageError(f"output {out} already exists; pass --overwrite to replace it")
    if not out.is_dir():
        why = "it is a file"
    elif not (out / MANIFEST).is_file():
        why = f"it has no {MANIFEST}"
    else:
        try:
            Manifest.read(out)
            return
        except UsageError as err:
            why = str(err)
    raise UsageError(
        f"--overwrite replaces only an mtdpo cache, and {out} is not one ({why}); "
        "nothing was changed: remove it yourself or choose another --out"
    )


# ── while writing ─────────────────────────────────────────────────────────────


@contextlib.contextmanager
def write_errors(out: Path) -> Iterator[None]:
    """An OSError of a write a user can act on (a full disk, a read-only or forbidden place)
    becomes one line naming the file and the cause; any other error goes on as it is."""
    try:
        yield
    except OSError as err:
        cause = WRITE_FAILURES.get(err.errno)
        if cause is None:
            raise
        file = f" ({err.filename})" if err.filename else ""
        kept = f"{out} is unchanged" if Path(out).exists() else "no cache written"
        raise UsageError(f"cannot write --out {out}: {cause}{file}; {kept}") from None
