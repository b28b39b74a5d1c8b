"""Stage one end to end: read → render + mask → truncate → write the cache.

Rows are processed in fixed-size chunks, in order, by `num_proc` workers with a bounded
number of chunks in flight, and each chunk's Arrow table goes straight into the current shard
(a new one starts at --max-shard-size), so memory does not grow with the input and the output
is the same for any `num_proc`. Everything is written into a temporary directory that is
renamed into place only when complete: an interrupted run never leaves a cache train would accept.

Nothing but an mtdpo cache is ever replaced, one run at a time per output (mtdpo/cache/output.py);
workers end with the main process however it ends (workers.py); each row is bounded in characters
and in time (limits.py).

The input's first rows decide the record kind (`detect_kind`): pairs make a pair cache,
unpaired labelled rows a KTO cache. A file holds one kind: a row of the other kind stops the
run in one line naming it (a mix is two datasets joined by mistake, and a cache holds one kind).
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import pyarrow as pa

from mtdpo import compat
from mtdpo.cache import PAIR, CacheWriter, Manifest, TokenizerInfo
from mtdpo.cache.files import remove_stale_runs
from mtdpo.cache.manifest import counts_of, token_totals_of
from mtdpo.cache.output import check_free_space, check_output_path, check_replaceable, output_lock
from mtdpo.cache.schema import features_of, starts_table, table_of
from mtdpo.errors import UsageError
from mtdpo.fingerprint import sha256_text, tokenizer_fingerprint, vocabulary_hash
from mtdpo.preprocess.limits import (
    DEFAULT_RENDER_TIMEOUT,
    RenderTimeout,
    check_row_size,
    default_max_chars,
    time_limit,
)
from mtdpo.preprocess.records import NO_TOOL_SUPPORT, Dropped, MaskOptions, OtherKind, RecordBuilder, builder_for
from mtdpo.preprocess.rows import RowError, row_kind
from mtdpo.preprocess.seed import resolve_seed_markers
from mtdpo.preprocess.sources import Source, open_source, parse_line
from mtdpo.preprocess.tokenizer import load_tokenizer
from mtdpo.preprocess.workers import ordered_map, stop_on_sigterm, worker_count

CHUNK_ROWS = 256  # rows per task sent to a worker
# The first rows of a run all over --render-timeout: the template never finishes, so the run stops
# rather than spend the limit on every row of the input.
STALLED_ROWS = 3
KIND_ROWS = 1000  # rows read to find the record kind before giving up (then: pairs, and each row says why not)
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

    def count(self, record, truncated: bool) -> None:
        """A kept record's contribution."""
        self.kept += 1
        self.truncated += truncated
        self.chosen_tokens += len(record.chosen)
        self.rejected_tokens += len(record.rejected)
        self.chosen_trained_tokens += record.chosen.trained_tokens
        self.rejected_trained_tokens += record.rejected.trained_tokens


@dataclass
class KtoTally:
    """Tally's counts for a KTO cache: its rows by label, tokens by label."""

    rows: int = 0
    kept: int = 0
    rejected: int = 0
    dropped: int = 0
    truncated: int = 0
    desirable: int = 0
    undesirable: int = 0
    desirable_tokens: int = 0
    undesirable_tokens: int = 0
    desirable_trained_tokens: int = 0
    undesirable_trained_tokens: int = 0
    reasons: Counter = field(default_factory=Counter)

    merge = Tally.merge

    def count(self, record, truncated: bool) -> None:
        group = record.group  # "desirable" or "undesirable"
        self.kept += 1
        self.truncated += truncated
        setattr(self, group, getattr(self, group) + 1)
        setattr(self, f"{group}_tokens", getattr(self, f"{group}_tokens") + len(record.sequence))
        trained = getattr(self, f"{group}_trained_tokens") + record.sequence.trained_tokens
        setattr(self, f"{group}_trained_tokens", trained)


def new_tally(kind: str) -> Tally | KtoTally:
    return Tally() if kind == PAIR else KtoTally()


@dataclass
class ChunkResult:
    table: pa.Table  # the kept records (Arrow: cheap to send between processes)
    starts: pa.Table  # where their sides of several sequences split (schema.starts_table)
    rejects: list[dict]  # {"row": n, "reason": ...} in row order
    tally: Tally
    stalled: bool = False  # the run's first rows all ran out of --render-timeout: stop the run


@dataclass(frozen=True)
class RowLimits:
    max_chars: int | None = None  # characters of one row; None: no limit
    render_timeout: float | None = DEFAULT_RENDER_TIMEOUT  # seconds per row; None or 0: no limit


class Chunk(list):
    """Rows sent to a worker as one task; `first` marks the run's first chunk."""

    first = False


class NothingKept(UsageError):
    """No row was kept: no cache is written. Carries the run's stats, for the summary table."""

    def __init__(self, message: str, stats: dict):
        super().__init__(message)
        self.stats = stats


# Set once in the main process before workers fork, so they share its tokenizer: it is loaded
# once per run, not once more per worker (nor twice with --num-proc 1).
_builder: RecordBuilder | None = None
_limits = RowLimits()


def process_chunk(chunk: list[tuple[int, object]]) -> ChunkResult:
    records, rejects, tally = [], [], new_tally(_builder.kind)
    reached = timed_out = 0  # rows that got to rendering, and those of them that ran out of time
    for n, row in chunk:
        tally.rows += 1
        try:
            row = _checked_row(row)
            _builder.check_kind(row)
            reached += 1
            with time_limit(_limits.render_timeout):
                record, truncated = _builder(n, row)
        except RenderTimeout as err:
            timed_out += 1
            _reject(tally, rejects, n, RowError(str(err)))
            if getattr(chunk, "first", False) and timed_out == reached >= STALLED_ROWS:
                return ChunkResult(
                    table_of(_builder.kind, records), starts_table(records), rejects, tally, stalled=True
                )
            continue
        except RowError as err:
            _reject(tally, rejects, n, err)
            continue
        records.append(record)
        tally.count(record, truncated)
    return ChunkResult(table_of(_builder.kind, records), starts_table(records), rejects, tally)


def _checked_row(row: object) -> object:
    """The row parsed (a jsonl line is parsed here, in the worker) and within --max-chars, or RowError."""
    if isinstance(row, bytes):
        row = parse_line(row)
    if isinstance(row, RowError):
        raise row
    if _limits.max_chars is not None:
        check_row_size(row, _limits.max_chars)
    return row


def _reject(tally, rejects: list[dict], n: int, err: RowError) -> None:
    kind = "dropped" if isinstance(err, Dropped) else "rejected"
    setattr(tally, kind, getattr(tally, kind) + 1)
    tally.reasons[_reason_kind(str(err))] += 1
    reject = {"row": n, "reason": str(err), "dropped": kind == "dropped"}
    rejects.append(reject | ({"other_kind": True} if isinstance(err, OtherKind) else {}))


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: drop the row-specific tail (indexes, values)."""
    grouped = ("invalid JSON", "chat template error", "row too long", NO_TOOL_SUPPORT)
    return reason.split(":")[0] if reason.startswith(grouped) else reason


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
    max_chars: int | None = None,
    render_timeout: float | None = DEFAULT_RENDER_TIMEOUT,
) -> dict:
    """Write the cache at `out` and return its stats (also saved as stats.json)."""
    started = time.perf_counter()
    out = Path(out)
    source = open_source(input_path, fmt, split, shard)  # a file, a directory of files or a hub name
    check_output_path(out, _local_paths(source))
    if num_proc < 1:
        raise UsageError("--num-proc must be at least 1")
    shard_bytes = _shard_bytes(max_shard_size)
    limits = _row_limits(max_chars, render_timeout, options.max_length)
    global _builder, _limits
    try:
        with stop_on_sigterm(out), output_lock(out):  # one run per output, from here to the rename
            remove_stale_runs(out)  # and put back a cache a killed run had moved aside, before deciding on it
            check_replaceable(out, overwrite)
            source.count_rows()  # each file's rows, for global row numbers and the --shard slice
            if source.total == 0:
                raise UsageError(f"input {input_path} holds no rows")
            kind, decided_by = detect_kind(source)
            check_free_space(out, _estimated_cache_bytes(source, options.max_length))
            with long_lived():
                tok = load_tokenizer(tokenizer, chat_template, trust_remote_code)
                if options.mode == "seed":
                    markers = resolve_seed_markers(options.user_marker, options.end_marker, tok.chat_template)
                    options = dataclasses.replace(options, user_marker=markers[0], end_marker=markers[1])
                where = chat_template or tok.name_or_path
                _builder = _record_builder(tok, options, limits.render_timeout, where, kind)
            _limits = limits
            workers = worker_count(num_proc, source.rows, CHUNK_ROWS, progress)
            # Renamed to `out` only when complete; the tokenizer copy is written while rows are processed.
            with (
                CacheWriter(out, shard_bytes, features_of(kind)) as cache,
                BackgroundSave(tok, cache.tokenizer_dir) as saver,
                closing(ordered_map(process_chunk, _chunks(source.read(parse=False), CHUNK_ROWS), workers)) as results,
            ):
                tally = new_tally(kind)
                for result in _with_progress(results, source.rows, progress):
                    if result.stalled:
                        raise UsageError(
                            f"the chat template never finishes rendering: the first {STALLED_ROWS} rows each took "
                            f"more than {limits.render_timeout:g} s (--render-timeout); no cache written"
                        )
                    if other := next((r for r in result.rejects if r.get("other_kind")), None):
                        where = source.where(other["row"])
                        at = f" ({where['file']} row {where['file_row']})" if where else ""
                        raise UsageError(
                            f"row {other['row']}{at}: {other['reason']} (row {decided_by} is the first of its kind); "
                            "a cache holds one kind: put pairs and unpaired rows in separate files"
                        )
                    if strict and (bad := next((r for r in result.rejects if not r["dropped"]), None)):
                        where = source.where(bad["row"])  # the file and its row, for a directory input
                        at = f" ({where['file']} row {where['file_row']})" if where else ""
                        raise UsageError(f"row {bad['row']}{at}: {bad['reason']} (--strict stops at the first bad row)")
                    cache.write(result.table, result.starts)
                    for reject in result.rejects:
                        cache.reject({"row": reject["row"], **source.where(reject["row"]), "reason": reject["reason"]})
                    tally.merge(result.tally)
                if tally.kept == 0:  # a cache of no pairs would only fail later, in train
                    _nothing_kept(input_path, out, shard, tally, cache, time.perf_counter() - started)
                saver.wait()
                stats = _stats(tally, time.perf_counter() - started)
                manifest = build_manifest(tok, cache.tokenizer_dir, options, source, tally, chat_template, kind)
                manifest = dataclasses.replace(manifest, trust_remote_code=trust_remote_code)
                cache.finish(manifest, stats)
                return stats
    finally:
        _builder, _limits = None, RowLimits()
        gc.unfreeze()  # what long_lived() froze can be collected again (preprocess called as a library)


def _shard_bytes(max_shard_size: str) -> int:
    try:
        size = compat.parse_size(max_shard_size)
    except ValueError:
        raise UsageError(f"--max-shard-size {max_shard_size!r}: give a size such as 500MB or 2GB") from None
    if size <= 0:
        raise UsageError(f"--max-shard-size {max_shard_size!r}: a shard must hold more than 0 bytes, e.g. 500MB")
    return size


def _row_limits(max_chars: int | None, render_timeout: float | None, max_length: int) -> RowLimits:
    if max_chars is not None and max_chars < 1:
        raise UsageError("--max-chars must be at least 1")
    if render_timeout is not None and not render_timeout >= 0:
        raise UsageError("--render-timeout must be 0 (no limit) or more seconds")
    chars = default_max_chars(max_length) if max_chars is None else max_chars
    return RowLimits(chars, render_timeout or None)


def _record_builder(tok, options: MaskOptions, render_timeout: float | None, where, kind: str = PAIR) -> RecordBuilder:
    """The RecordBuilder (KtoRecordBuilder for unpaired rows); its chat template renders a one-turn
    probe first, so a template that never finishes is caught here, once, under the same time
    limit as a row."""
    try:
        with time_limit(render_timeout):
            return builder_for(kind)(tok, options)
    except RenderTimeout as err:
        raise UsageError(
            f"the chat template of {where} never finishes rendering: a one-turn conversation took more than "
            f"{err.seconds:g} s (--render-timeout)"
        ) from None


def _local_paths(source: Source) -> list[Path]:
    """The input's paths on this machine (none for a hub dataset), to keep --out off them."""
    return [] if source.hub is not None else [Path(source.spec), *(f.path for f in source.files)]


def _estimated_cache_bytes(source: Source, max_length: int) -> int:
    """A low estimate of the shards' size, to refuse a run that cannot fit before it starts: each
    kept token position costs 16 bytes (id and label, int32, for both sides), at most --max-length
    per side, and a token stands for a few characters of input, so the shards take at least about
    half the input's bytes unless truncation cuts most of them (for a --shard slice, its share of
    the input). 0 for a hub dataset (unknown)."""
    if source.hub is not None or not source.total:
        return 0
    size = sum(_bytes(f.path) for f in source.files) * source.rows // source.total
    return min(size // 2, source.rows * max_length * 16)


def _bytes(path: Path) -> int:
    """A file's size, or the sizes of the files under a directory (a saved `datasets` dataset)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _nothing_kept(input_path, out: Path, shard: str | None, tally, cache: CacheWriter, seconds: float) -> None:
    """Stop a run that kept no row: no cache (train would refuse an empty one), but the rejects are
    kept beside the output, where they do not make it look like a cache."""
    if not tally.rows:
        raise UsageError(f"{input_path}: --shard {shard} holds no rows; no cache written")
    top = ", ".join(f"{count} {reason}" for reason, count in tally.reasons.most_common(3))
    rejects = out.with_name(f"{out.name}.rejects.jsonl")
    cache.keep_rejects(rejects)
    raise NothingKept(
        f"{input_path}: kept 0 of {tally.rows} rows ({top}); no cache written; the rejects are in {rejects}",
        _stats(tally, seconds),
    )


def detect_kind(source: Source) -> tuple[str, int | None]:
    """The record kind of the input and the row that decided it: the first of its first KIND_ROWS
    rows whose keys name a kind (`rows.row_kind`); pairs when none does."""
    for n, row in islice(source.read(parse=True), KIND_ROWS):
        if (kind := row_kind(row)) is not None:
            return kind, n
    return PAIR, None


def build_manifest(
    tok, saved_tokenizer: Path, options: MaskOptions, source: Source, tally, chat_template, kind: str = PAIR
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
        tools_as_text=options.tools_as_text,
        control_as_text=options.control_as_text,
        max_length=options.max_length,
        input=source.describe(),
        shard=source.shard_info(),
        counts={k: getattr(tally, k) for k in counts_of(kind)},
        tokens={k: getattr(tally, k) for k in token_totals_of(kind)},
        kind=kind,
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


def _chunks(rows: Iterator, size: int) -> Iterator[Chunk]:
    first = True
    while items := list(islice(rows, size)):
        chunk = Chunk(items)
        chunk.first, first = first, False
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
