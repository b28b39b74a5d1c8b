"""Stage one end to end: read → render + mask → truncate → write the cache.

Rows are processed in fixed-size chunks, in order, by `num_proc` workers with a bounded
number of chunks in flight, and each chunk's Arrow table goes straight into the current shard
(a new one starts at --max-shard-size), so memory does not grow with the input and the output
is the same for any `num_proc`. Everything is written into a temporary directory that is
renamed into place only when complete: an interrupted run never leaves a cache train would accept.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import pyarrow as pa

from mtdpo import compat
from mtdpo.cache import CacheWriter, Manifest, TokenizerInfo, pair_table
from mtdpo.cache.manifest import COUNTS, TOKEN_TOTALS
from mtdpo.cache.schema import starts_table
from mtdpo.errors import UsageError
from mtdpo.fingerprint import sha256_text, tokenizer_fingerprint, vocabulary_hash
from mtdpo.preprocess.records import Dropped, MaskOptions, RecordBuilder
from mtdpo.preprocess.rows import RowError
from mtdpo.preprocess.seed import resolve_seed_markers
from mtdpo.preprocess.sources import Source, open_source, parse_line
from mtdpo.preprocess.tokenizer import load_tokenizer

CHUNK_ROWS = 256  # rows per task sent to a worker
BACKGROUND_SAVE_VOCAB = 100_000  # tokens: larger tokenizers are saved by a forked process


@dataclass
class Tally:
    rows: int = 0
    kept: int = 0
    rejected: int = 0  # unusable rows (bad JSON, bad roles, template errors …)
    dropped: int = 0  # valid rows left without a trained token by truncation
    truncated: int = 0  # kept rows cut to --max-length
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    chosen_trained_tokens: int = 0
    rejected_trained_tokens: int = 0
    reasons: Counter = field(default_factory=Counter)

    def merge(self, other: Tally) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class ChunkResult:
    table: pa.Table  # the kept records (Arrow: cheap to send between processes)
    starts: pa.Table  # where their sides of several sequences split (schema.starts_table)
    rejects: list[dict]  # {"row": n, "reason": ...} in row order
    tally: Tally


# Set once in the main process before workers fork, so they share its tokenizer: it is loaded
# once per run, not once more per worker (nor twice with --num-proc 1).
_builder: RecordBuilder | None = None


def process_chunk(chunk: list[tuple[int, object]]) -> ChunkResult:
    records, rejects, tally = [], [], Tally()
    for n, row in chunk:
        tally.rows += 1
        try:
            if isinstance(row, bytes):  # a jsonl line, parsed here in the worker
                row = parse_line(row)
            if isinstance(row, RowError):
                raise row
            record, truncated = _builder(n, row)
        except RowError as err:
            kind = "dropped" if isinstance(err, Dropped) else "rejected"
            setattr(tally, kind, getattr(tally, kind) + 1)
            tally.reasons[_reason_kind(str(err))] += 1
            rejects.append({"row": n, "reason": str(err), "dropped": kind == "dropped"})
            continue
        records.append(record)
        tally.kept += 1
        tally.truncated += truncated
        tally.chosen_tokens += len(record.chosen)
        tally.rejected_tokens += len(record.rejected)
        tally.chosen_trained_tokens += record.chosen.trained_tokens
        tally.rejected_trained_tokens += record.rejected.trained_tokens
    return ChunkResult(pair_table(records), starts_table(records), rejects, tally)


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: drop the row-specific tail (indexes, values)."""
    return reason.split(":")[0] if reason.startswith(("invalid JSON", "chat template error")) else reason


def preprocess(
    input_path: Path,
    out: Path,
    *,
    tokenizer: str | None = None,
    chat_template: Path | None = None,
    options: MaskOptions = MaskOptions(),
    num_proc: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    fmt: str = "auto",
    max_shard_size: str = "500MB",
    progress: bool = True,
    trust_remote_code: bool = False,
    split: str = "train",
    shard: str | None = None,
) -> dict:
    """Write the cache at `out` and return its stats (also saved as stats.json)."""
    started = time.perf_counter()
    out = Path(out)
    source = open_source(input_path, fmt, split, shard)  # a file, a directory of files or a hub name
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} already exists; pass --overwrite to replace it")
    if num_proc < 1:
        raise UsageError("--num-proc must be at least 1")
    try:
        shard_bytes = compat.parse_size(max_shard_size)
    except ValueError:
        raise UsageError(f"--max-shard-size {max_shard_size!r}: give a size such as 500MB or 2GB") from None
    global _builder
    try:
        with long_lived():
            tok = load_tokenizer(tokenizer, chat_template, trust_remote_code)
            if options.mode == "seed":
                markers = resolve_seed_markers(options.user_marker, options.end_marker, tok.chat_template)
                options = MaskOptions(options.mode, options.max_length, *markers)
            _builder = RecordBuilder(tok, options)
        source.count_rows()  # each file's rows, for global row numbers and the --shard slice
        if source.total == 0:
            raise UsageError(f"input {input_path} holds no rows")
        # Renamed to `out` only when complete; the tokenizer copy is written while rows are processed.
        with CacheWriter(out, shard_bytes) as cache, BackgroundSave(tok, cache.tokenizer_dir) as saver:
            tally = Tally()
            results = ordered_map(process_chunk, _chunks(source.read(parse=False), CHUNK_ROWS), num_proc)
            for result in _with_progress(results, source.rows, progress):
                if strict and (bad := next((r for r in result.rejects if not r["dropped"]), None)):
                    where = source.where(bad["row"])  # the file and its row, for a directory input
                    at = f" ({where['file']} row {where['file_row']})" if where else ""
                    raise UsageError(f"row {bad['row']}{at}: {bad['reason']} (--strict stops at the first bad row)")
                cache.write(result.table, result.starts)
                for reject in result.rejects:
                    cache.reject({"row": reject["row"], **source.where(reject["row"]), "reason": reject["reason"]})
                tally.merge(result.tally)
            if tally.kept == 0:  # a cache of no pairs would only fail later, in train
                top = ", ".join(f"{count} {reason}" for reason, count in tally.reasons.most_common(3))
                why = f"kept 0 of {tally.rows} rows ({top})" if tally.rows else f"--shard {shard} holds no rows"
                raise UsageError(f"{input_path}: {why}; no cache written")
            saver.wait()
            stats = _stats(tally, time.perf_counter() - started)
            cache.finish(build_manifest(tok, cache.tokenizer_dir, options, source, tally, chat_template), stats)
            return stats
    finally:
        _builder = None
        gc.unfreeze()  # what long_lived() froze can be collected again (preprocess called as a library)


def build_manifest(
    tok, saved_tokenizer: Path, options: MaskOptions, source: Source, tally: Tally, chat_template
) -> Manifest:
    """What made the cache: the tokenizer, template and mask options, the input and its slice,
    counts and token totals."""
    tokenizer = TokenizerInfo(
        name_or_path=str(tok.name_or_path),
        # The saved copy's bytes (what train compares first); a vocabulary hash if none was written.
        fingerprint=tokenizer_fingerprint(saved_tokenizer) or vocabulary_hash(tok),
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Manifest(
        tokenizer=tokenizer,
        chat_template_sha256=sha256_text(tok.chat_template),
        chat_template_file=str(chat_template) if chat_template else None,
        mask_mode=options.mode,
        seed_markers=[options.user_marker, options.end_marker] if options.mode == "seed" else None,
        max_length=options.max_length,
        input=source.describe(),
        shard=source.shard_info(),
        counts={k: getattr(tally, k) for k in COUNTS},
        tokens={k: getattr(tally, k) for k in TOKEN_TOTALS},
    )


@contextmanager
def long_lived():
    """Keep the cyclic garbage collector off what lives for the whole run: the interpreter's
    modules and the tokenizer. Loading Gemma 3's tokenizer makes millions of objects, and each
    full collection walks every object there is (several run during that load).
    So what exists is frozen, the load runs with the collector paused, and what it made is frozen
    too. Forked workers inherit the frozen objects: their collections neither walk them nor copy
    the pages that hold them. The caller unfreezes at the end of the run."""
    enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


class BackgroundSave:
    """The tokenizer copy, written by a forked process while the main one goes on (saving Gemma
    3's 33 MB tokenizer.json is CPU work). A small tokenizer is saved at once: forking would cost
    more than the save. `wait()` raises if the copy failed."""

    def __init__(self, tokenizer, directory: Path):
        self.directory, self.process, self.failure = directory, None, ""
        if len(tokenizer) < BACKGROUND_SAVE_VOCAB:
            try:
                _save(tokenizer, directory)
            except SystemExit as err:
                self.failure = str(err)
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool across fork
        self.process = multiprocessing.get_context("fork").Process(
            target=_save, args=(tokenizer, directory), daemon=True
        )
        self.process.start()

    def __enter__(self) -> BackgroundSave:
        return self

    def __exit__(self, *exc) -> None:
        if (
            self.process is not None and self.process.is_alive()
        ):  # the run failed: stop it before the directory is removed
            self.process.terminate()
            self.process.join()

    def wait(self) -> None:
        if self.process is not None:
            self.process.join()  # the child said why on stderr
            self.failure = self.failure or (f"exit code {self.process.exitcode}" if self.process.exitcode else "")
        if self.failure or not (self.directory / "tokenizer_config.json").is_file():
            raise UsageError(
                f"could not write the tokenizer copy to {self.directory} ({self.failure or 'no tokenizer_config.json'}); is the disk full?"
            )


def _save(tokenizer, directory: Path) -> None:
    try:
        tokenizer.save_pretrained(str(directory))
    except Exception as err:  # in the child: one line on stderr and exit code 1, not a traceback
        raise SystemExit(f"saving failed: {err}") from None


def ordered_map(fn: Callable, items: Iterable, num_proc: int) -> Iterator:
    """map() over forked processes, results in input order, at most 2 items per worker in flight."""
    if num_proc == 1:
        yield from map(fn, items)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool across fork
    context = multiprocessing.get_context("fork")  # workers inherit the loaded tokenizer
    with ProcessPoolExecutor(num_proc, mp_context=context) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(rows, size)):
        yield chunk


def _with_progress(results: Iterator[ChunkResult], total: int | None, enabled: bool) -> Iterator[ChunkResult]:
    if not enabled:  # a library call without a bar does not import rich
        yield from results
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("preprocess"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("rows", total=total)
        for result in results:
            bar.advance(task, result.tally.rows)
            yield result


def _stats(tally: Tally, seconds: float) -> dict:
    stats = asdict(tally)
    stats["reasons"] = dict(tally.reasons.most_common())
    stats["seconds"] = round(seconds, 3)
    stats["rows_per_second"] = round(tally.rows / seconds, 1) if seconds else None
    return stats
