"""The processes of a run: the worker pool that masks chunks of rows, how many workers, and what
ends them. Workers never outlive the run: leaving the pool early kills them, and each worker dies
with the main process however that one ends (SIGKILL included); SIGTERM ends a run as Ctrl-C does.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

from mtdpo.errors import Interrupted, UsageError

# How often a worker looks whether its parent is gone, where the kernel cannot tell it (not Linux).
PARENT_CHECK_SECONDS = 1.0
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def worker_count(num_proc: int, rows: int | None, chunk_rows: int, notify: bool) -> int:
    """--num-proc, capped by the CPUs this process may run on and by the chunks there are to share
    (a worker per chunk at most: more would only fork idle copies of the tokenizer)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    chunks = math.ceil(rows / chunk_rows) if rows is not None else None
    count = min(num_proc, cpus, max(chunks, 1) if chunks is not None else num_proc)
    if count < num_proc and notify:
        plural = "s" if chunks != 1 else ""
        why = (
            f"{cpus} CPUs available"
            if count == cpus
            else f"the input makes {chunks} chunk{plural} of {chunk_rows} rows"
        )
        print(f"note: --num-proc {num_proc} capped to {count} ({why})", file=sys.stderr)
    return count


@contextmanager
def stop_on_sigterm(out: Path) -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`, `timeout`) ends the run as Ctrl-C does: the workers are
    stopped and the temporary directory removed on the way out; the CLI exits with 143. Only the
    first one counts: a second must not cut that clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kept = f"{out} is unchanged" if out.exists() else "no cache written"
        raise Interrupted(f"preprocess stopped by SIGTERM; {kept}", signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ordered_map(fn: Callable, items: Iterable, num_proc: int) -> Iterator:
    """map() over forked processes, results in input order, at most 2 items per worker in flight.
    Leaving early (an error, Ctrl-C, SIGTERM, `close()`) kills the workers rather than waiting for
    the chunks in flight; a worker that dies (the system's out-of-memory killer) is one line."""
    if num_proc == 1:
        yield from map(fn, items)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool across fork
    context = multiprocessing.get_context("fork")  # workers inherit the loaded tokenizer
    pool = ProcessPoolExecutor(num_proc, mp_context=context, initializer=_worker_start, initargs=(os.getpid(),))
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        _stop_workers(pool)
        raise UsageError(
            "a --num-proc worker process died (killed from outside, or by the system for lack of memory); "
            "no cache written"
        ) from None
    except BaseException:
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the workers now: they ignore SIGTERM and SIGINT (see _worker_start)."""
    processes = list((pool._processes or {}).values())  # no public handle on them before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join()


def _worker_start(parent: int) -> None:
    """In each worker: end with the main process however it ends (a SIGKILL gives it no chance to
    stop its workers), and leave SIGTERM and SIGINT to it, so that a signal sent to the whole
    process group stops the run through the main process's clean-up, not by breaking the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _kill_me_with_my_parent()
    if os.getppid() != parent:  # the parent died before the kernel was told
        os._exit(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _kill_me_with_my_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # the watchdog thread still sees the parent go


def _exit_when_orphaned(parent: int) -> None:
    """The fallback where the kernel cannot tell: a process whose parent died is adopted by another."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)
