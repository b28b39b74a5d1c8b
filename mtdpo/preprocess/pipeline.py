"""Stage one end to end: read → render + mask → truncate → write schema-1 shards.

Rows are processed in fixed-size chunks, in order, by `num_proc` workers with a bounded
number of chunks in flight, and each chunk's Arrow table goes straight into the current shard
(a new one starts at --max-shard-size), so memory does not grow with the input and the output
is the same for any `num_proc`. Everything is written into a temporary directory that is
renamed into place only when complete: an interrupted run never leaves a cache train would accept.
"""

from __future__ import annotations

import gc
import json
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
from datasets import DatasetInfo
from datasets.arrow_writer import ArrowWriter
from datasets.utils.py_utils import asdict as info_dict
from datasets.utils.py_utils import convert_file_size_to_int

from mtdpo.cache import IGNORE_INDEX, build_manifest, features, write_checksums, write_json, writing
from mtdpo.errors import UsageError
from mtdpo.families import detect_family
from mtdpo.preprocess.encode import Dropped, MaskOptions, PairEncoder
from mtdpo.preprocess.rows import RowError
from mtdpo.preprocess.sources import open_source, parse_line
from mtdpo.tokenizer import load_tokenizer, sha256_text

CHUNK_ROWS = 256  # rows per task sent to a worker
BATCH_ROWS = 1000  # pairs per Arrow record batch in a shard (datasets' default writer batch)
BACKGROUND_SAVE_VOCAB = 100_000  # tokens: larger tokenizers are saved by a forked process
FEATURES = features()  # the schema of docs/DESIGN.md, "The cache contract" (mtdpo/cache.py)
SCHEMA = FEATURES.arrow_schema


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
    table: pa.Table  # the kept pairs, schema-1 columns (Arrow: cheap to send between processes)
    rejects: list[dict]  # {"row": n, "reason": ...} in row order
    tally: Tally


# Set once in the main process before workers fork, so they share its tokenizer: it is loaded
# once per run, not once more per worker (nor twice with --num-proc 1).
_encoder: PairEncoder | None = None


def encode_chunk(chunk: list[tuple[int, object]]) -> ChunkResult:
    records, rejects, tally = [], [], Tally()
    for n, row in chunk:
        tally.rows += 1
        try:
            if isinstance(row, bytes):  # a jsonl line, parsed here in the worker
                row = parse_line(row)
            if isinstance(row, RowError):
                raise row
            record, truncated = _encoder(row)
        except RowError as err:
            kind = "dropped" if isinstance(err, Dropped) else "rejected"
            setattr(tally, kind, getattr(tally, kind) + 1)
            tally.reasons[_reason_kind(str(err))] += 1
            rejects.append({"row": n, "reason": str(err), "dropped": kind == "dropped"})
            continue
        record["row"] = n
        records.append(record)
        tally.kept += 1
        tally.truncated += truncated
        tally.chosen_tokens += record["chosen_len"]
        tally.rejected_tokens += record["rejected_len"]
        tally.chosen_trained_tokens += record["chosen_len"] - record["chosen_labels"].count(IGNORE_INDEX)
        tally.rejected_trained_tokens += record["rejected_len"] - record["rejected_labels"].count(IGNORE_INDEX)
    return ChunkResult(pa.Table.from_pylist(records, schema=SCHEMA), rejects, tally)


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
    if options.max_length < 1:
        raise UsageError("--max-length must be at least 1")
    try:
        shard_bytes = convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise UsageError(f"--max-shard-size {max_shard_size!r}: give a size such as 500MB or 2GB") from None
    global _encoder
    try:
        with long_lived():
            tok = load_tokenizer(tokenizer, chat_template, trust_remote_code)
            options = _resolve_seed_markers(options, tok.chat_template)
            _encoder = PairEncoder(tok, options)
        source.count_rows()  # each file's rows, for global row numbers and the --shard slice
        if source.total == 0:
            raise UsageError(f"input {input_path} holds no rows")
        # Renamed to `out` only when complete; the tokenizer copy is written while rows are encoded.
        with writing(out) as tmp, BackgroundSave(tok, tmp / "tokenizer") as saver:
            tally = Tally()
            with ShardWriter(tmp, shard_bytes) as shards, open(tmp / "rejects.jsonl", "w") as rejects:
                results = ordered_map(encode_chunk, _chunks(source.read(parse=False), CHUNK_ROWS), num_proc)
                for result in _with_progress(results, source.rows, progress):
                    if strict and (bad := next((r for r in result.rejects if not r["dropped"]), None)):
                        where = source.where(bad["row"])  # the file and its row, for a directory input
                        at = f" ({where['file']} row {where['file_row']})" if where else ""
                        raise UsageError(f"row {bad['row']}{at}: {bad['reason']} (--strict stops at the first bad row)")
                    shards.write(result.table)
                    for reject in result.rejects:
                        rejects.write(
                            json.dumps(
                                {"row": reject["row"], **source.where(reject["row"]), "reason": reject["reason"]}
                            )
                            + "\n"
                        )
                    tally.merge(result.tally)
            if tally.kept == 0:  # a cache of no pairs would only fail later, in train
                top = ", ".join(f"{count} {reason}" for reason, count in tally.reasons.most_common(3))
                why = f"kept 0 of {tally.rows} rows ({top})" if tally.rows else f"--shard {shard} holds no rows"
                raise UsageError(f"{input_path}: {why}; no cache written")
            saver.wait()
            write_dataset_files(tmp, shards.names)
            seconds = time.perf_counter() - started
            stats = _stats(tally, seconds)
            write_json(tmp / "stats.json", stats)
            write_json(
                tmp / "manifest.json", build_manifest(tok, tmp / "tokenizer", options, source, tally, chat_template)
            )
            return stats
    finally:
        _encoder = None
        gc.unfreeze()  # what long_lived() froze can be collected again (preprocess called as a library)


@contextmanager
def long_lived():
    """Keep the cyclic garbage collector off what lives for the whole run: the interpreter's
    modules and the tokenizer. Loading Gemma 3's tokenizer makes millions of objects, and each
    full collection walks every object there is (7 of them during that load: 1.3 s of a 5 s run).
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


class ShardWriter:
    """Arrow shards written while the rows stream in, in record batches of BATCH_ROWS pairs
    (as `datasets.save_to_disk` writes them, so the bytes depend on neither chunking nor
    --num-proc). A new file starts when the next batch would take the current one past
    `max_bytes`. Files are named data-NNNNN-of-MMMMM.arrow, as save_to_disk names them, once the
    count is known (at close). With no pair written it leaves one shard: the schema, no rows."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = Path(directory), max_bytes
        self.names: list[str] = []
        self._pending: list[pa.Table] = []  # rows not yet written: fewer than BATCH_ROWS
        self._pending_rows = 0
        self._open()

    def _open(self) -> None:
        self.names.append(f"data-{len(self.names):05d}.arrow")
        self._writer = ArrowWriter(features=FEATURES, path=str(self.directory / self.names[-1]))

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += len(table)
        while self._pending_rows >= BATCH_ROWS:
            self._write_batch(BATCH_ROWS)

    def _write_batch(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        batch, rest = pending.slice(0, rows), pending.slice(rows)
        self._pending, self._pending_rows = [rest], len(rest)
        if self._writer._num_examples and self._writer._num_bytes + batch.nbytes > self.max_bytes:
            self._close_file()
            self._open()
        self._writer.write_table(batch)

    def _close_file(self) -> None:
        self._writer.finalize()
        self._writer.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self._pending_rows:
            self._write_batch(self._pending_rows)
        self._close_file()
        if exc[0] is None:
            final = [f"data-{i:05d}-of-{len(self.names):05d}.arrow" for i in range(len(self.names))]
            for name, new in zip(self.names, final):
                (self.directory / name).rename(self.directory / new)
            self.names = final


def write_dataset_files(directory: Path, shards: list[str]) -> None:
    """What `datasets.load_from_disk` reads besides the shards (dataset_info.json and state.json,
    as `save_to_disk` writes them), and checksums.json. The state's fingerprint is derived from
    the checksums, so preprocessing the same input twice gives byte-equal files."""
    info = info_dict(DatasetInfo(features=FEATURES))
    (directory / "dataset_info.json").write_text(json.dumps({key: info[key] for key in sorted(info)}, indent=2))
    write_checksums(directory)
    state = {
        "_data_files": [{"filename": name} for name in shards],
        "_fingerprint": sha256_text((directory / "checksums.json").read_text())[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


class BackgroundSave:
    """The tokenizer copy, written by a forked process while the main one goes on (Gemma 3's
    33 MB take 0.65 s of CPU to save). A small tokenizer is saved at once: forking would cost
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
    if not enabled:  # a library call without a bar does not import rich (40 ms)
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


def _resolve_seed_markers(options: MaskOptions, template: str) -> MaskOptions:
    if options.mode not in ("assistant", "seed"):
        raise UsageError(f"unknown --mask-mode {options.mode!r}; use assistant or seed")
    if options.mode != "seed" or (options.user_marker and options.end_marker):
        return options
    family = detect_family(template)
    if family is None or family.seed_markers is None:
        raise UsageError("--mask-mode seed: unknown template family; pass --user-marker and --end-marker")
    user, end = family.seed_markers
    return MaskOptions(options.mode, options.max_length, options.user_marker or user, options.end_marker or end)


def _stats(tally: Tally, seconds: float) -> dict:
    stats = asdict(tally)
    stats["reasons"] = dict(tally.reasons.most_common())
    stats["seconds"] = round(seconds, 3)
    stats["rows_per_second"] = round(tally.rows / seconds, 1) if seconds else None
    return stats
