"""What one row may cost: a bound on its characters and on the time it takes to render and mask.

A row far longer than --max-length is cut to it anyway, but rendering and tokenising it first
takes memory and time in proportion to its whole length (many times the row's size), so a row
over --max-chars is rejected before it is rendered, with a reason that says what to pass to keep
it. A chat template that loops would hang the run: each row gets --render-timeout seconds, and a
template that never finishes stops the run instead of costing that much time on every row.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

from mtdpo.preprocess.rows import RowError

# --max-chars defaults to this many characters per token of --max-length, and never less than
# MIN_DEFAULT_CHARS. A row holds two sides, each cut to --max-length tokens, and tokens of any
# tokenizer average far fewer than 32 characters, so a longer row would lose most of its text to
# truncation anyway; the floor keeps rows of ordinary size (truncated as before) under a small --max-length.
CHARS_PER_TOKEN = 64
MIN_DEFAULT_CHARS = 1_000_000
# Seconds per row: generous, since the longest rows accepted (512 messages) render one prefix per message.
DEFAULT_RENDER_TIMEOUT = 60.0


class RenderTimeout(Exception):
    """A row took longer than --render-timeout. Not a RowError: code that catches a template's
    own errors (its probes, the skeleton cache) must not take it for one and render again."""

    def __init__(self, seconds: float):
        super().__init__(f"chat template render took more than {seconds:g} s (--render-timeout)")
        self.seconds = seconds


def default_max_chars(max_length: int) -> int:
    return max(CHARS_PER_TOKEN * max_length, MIN_DEFAULT_CHARS)


def check_row_size(row: object, max_chars: int) -> None:
    """Raise RowError if the row's strings hold more than `max_chars` characters together."""
    count = row_characters(row)
    if count > max_chars:
        raise RowError(
            f"row too long: {count:,} characters, more than --max-chars {max_chars:,}; "
            f"pass --max-chars {count} or more to keep it"
        )


def row_characters(row: object) -> int:
    """The characters of every string in a row, keys included (lengths only: nothing is copied)."""
    count, stack = 0, [row]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            count += len(value)
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return count


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise RenderTimeout in the block once `seconds` have passed (SIGALRM; Jinja runs Python
    code, so the signal lands between two of its steps). No limit where signals cannot be set:
    off the main thread, or with seconds None or 0. A timer someone else had set is set again
    afterwards, with the time it had left."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = True

    def on_alarm(signum, frame):
        if armed:  # a signal that lands after the block ended is dropped
            raise RenderTimeout(seconds)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    started = time.monotonic()
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-6), interval)
