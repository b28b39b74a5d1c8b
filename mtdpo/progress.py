"""Progress of the long phases (loading a model, the first training step, an eval, precompute-ref),
on stderr so that stdout keeps the run's log lines.

On a terminal: a transient rich bar (or spinner, when the length is unknown) with the elapsed time
and, when the length is known, the time remaining. Elsewhere (a log file, a pipe): plain lines, so
a job's log shows where minutes go; a phase shorter than DELAY seconds prints nothing there.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

DELAY = 2.0  # seconds before a phase says anything in a log (a short one stays silent)
EVERY = 10.0  # seconds between two progress lines of one phase in a log


@contextlib.contextmanager
def phase(label: str, total: int | None = None, unit: str = "", enabled: bool = True) -> Iterator[Callable]:
    """Show `label` while the block runs; yields advance(n) for the block to count done units."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    phase = _Bar(label, total, unit, console) if console.is_terminal else _Lines(label, total, unit)
    try:
        yield phase.advance
    finally:
        phase.close()


class _Bar:
    def __init__(self, label: str, total: int | None, unit: str, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if total is None:
            columns = (SpinnerColumn(), TextColumn(label), TimeElapsedColumn())
        else:
            columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn())
            columns += (TextColumn("eta"), TimeRemainingColumn())
        self.bar = Progress(*columns, console=console, transient=True, redirect_stdout=False, redirect_stderr=False)
        self.task = self.bar.add_task(label, total=total)
        self.bar.start()

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)

    def close(self) -> None:
        self.bar.stop()


class _Lines:
    """A line once the phase has run DELAY seconds, then one every EVERY seconds, and a last one."""

    def __init__(self, label: str, total: int | None, unit: str):
        self.label, self.total, self.unit = label, total, unit
        self.done, self.started, self.said = 0, time.perf_counter(), None
        self.lock = threading.Lock()
        # A phase may block for minutes before its first unit (loading a model, a first batch): a
        # timer says it is under way.
        self.timer = threading.Timer(DELAY, self._say)
        self.timer.daemon = True
        self.timer.start()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.started >= DELAY and (self.said is None or now - self.said >= EVERY):
            self._say()

    def _say(self) -> None:
        with self.lock:
            self.said = time.perf_counter()
            print(f"{self.label}: {self._status()}", file=sys.stderr, flush=True)

    def _status(self) -> str:
        elapsed = time.perf_counter() - self.started
        if self.total is None:
            return f"{clock(elapsed)} elapsed"
        eta = elapsed * (self.total - self.done) / self.done if self.done else None
        return f"{self.done}/{self.total} {self.unit}, {clock(elapsed)} elapsed, eta {clock(eta) if eta is not None else '?'}"

    def close(self) -> None:
        self.timer.cancel()
        with self.lock:
            if self.said is not None:  # it said it started: say it ended
                counted = "done" if self.total is None else f"{self.done}/{self.total} {self.unit}"
                took = clock(time.perf_counter() - self.started)
                print(f"{self.label}: {counted} in {took}", file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
