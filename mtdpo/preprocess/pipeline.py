"""Stage one end to end: read → render + mask → truncate → write schema-1 shards.

Rows are processed in fixed-size chunks, in order, by `num_proc` workers with a bounded
number of chunks in flight, so memory does not grow with the input and the output is the
same for any `num_proc`. Everything is written into a temporary directory that is renamed
into place only when complete: an interrupted run never leaves a cache train would accept.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import datasets
import pyarrow as pa
from datasets import Dataset, Features, List, Value
from datasets.arrow_writer import ArrowWriter

from mtdpo import __version__
from mtdpo.cache import SCHEMA_VERSION, remove_stale_runs, replace_dir, write_checksums
from mtdpo.errors import UsageError
from mtdpo.preprocess.encode import Dropped, MaskOptions, PairEncoder
from mtdpo.preprocess.mask import IGNORE_INDEX, seed_markers
from mtdpo.preprocess.rows import RowError
from mtdpo.preprocess.sources import open_source
from mtdpo.tokenizer import fingerprint, load_tokenizer, sha256_text

CHUNK_ROWS = 256
TOKEN_LIST = List(Value("int32"))
FEATURES = Features(
    {
        "chosen_input_ids": TOKEN_LIST,
        "chosen_labels": TOKEN_LIST,
        "rejected_input_ids": TOKEN_LIST,
        "rejected_labels": TOKEN_LIST,
        "prompt_len": Value("int32"),
        "chosen_len": Value("int32"),
        "rejected_len": Value("int32"),
        "row": Value("int64"),
    }
)


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
    records: list[dict]
    rejects: list[dict]  # {"row": n, "reason": ...} in row order
    tally: Tally


_encoder: PairEncoder | None = None  # one per worker process


def _init_worker(tokenizer_dir: str, options: MaskOptions, trust_remote_code: bool = False) -> None:
    from transformers import AutoTokenizer

    global _encoder
    _encoder = PairEncoder(AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code), options)


def encode_chunk(chunk: list[tuple[int, object]]) -> ChunkResult:
    result = ChunkResult([], [], Tally())
    tally = result.tally
    for n, row in chunk:
        tally.rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            record, truncated = _encoder(row)
        except RowError as err:
            kind = "dropped" if isinstance(err, Dropped) else "rejected"
            setattr(tally, kind, getattr(tally, kind) + 1)
            tally.reasons[_reason_kind(str(err))] += 1
            result.rejects.append({"row": n, "reason": str(err), "dropped": kind == "dropped"})
            continue
        record["row"] = n
        result.records.append(record)
        tally.kept += 1
        tally.truncated += truncated
        tally.chosen_tokens += record["chosen_len"]
        tally.rejected_tokens += record["rejected_len"]
        tally.chosen_trained_tokens += sum(label != IGNORE_INDEX for label in record["chosen_labels"])
        tally.rejected_trained_tokens += sum(label != IGNORE_INDEX for label in record["rejected_labels"])
    return result


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
    tok = load_tokenizer(tokenizer, chat_template, trust_remote_code)
    options = _resolve_seed_markers(options, tok.chat_template)
    source.count_rows()  # each file's rows, for global row numbers and the --shard slice
    if source.total == 0:
        raise UsageError(f"input {input_path} holds no rows")

    tmp = out.with_name(f".{out.name}.incomplete-{os.getpid()}")
    parts = out.with_name(f".{out.name}.parts-{os.getpid()}")
    remove_stale_runs(out)  # temporary dirs of killed runs: their PID is gone
    for stale in (tmp, parts):
        shutil.rmtree(stale, ignore_errors=True)
    parts.mkdir(parents=True)
    tmp.mkdir(parents=True)
    try:
        tok.save_pretrained(str(tmp / "tokenizer"))
        tally = Tally()
        part_file = parts / "part-00000.arrow"
        with ArrowWriter(features=FEATURES, path=str(part_file)) as writer, open(tmp / "rejects.jsonl", "w") as rejects:
            chunks = _chunks(source.read(), CHUNK_ROWS)
            results = ordered_map(encode_chunk, chunks, num_proc, _init_worker, (str(tmp / "tokenizer"), options, trust_remote_code))
            for result in _with_progress(results, source.rows, progress):
                if strict and (bad := next((r for r in result.rejects if not r["dropped"]), None)):
                    where = source.where(bad["row"])  # the file and its row, for a directory input
                    at = f" ({where['file']} row {where['file_row']})" if where else ""
                    raise UsageError(f"row {bad['row']}{at}: {bad['reason']} (--strict stops at the first bad row)")
                if result.records:
                    writer.write_table(pa.Table.from_pylist(result.records, schema=FEATURES.arrow_schema))
                for reject in result.rejects:
                    rejects.write(json.dumps({"row": reject["row"], **source.where(reject["row"]), "reason": reject["reason"]}) + "\n")
                tally.merge(result.tally)
            writer.finalize()
        with _quiet_datasets():
            kept = Dataset.from_file(str(part_file))
            # datasets writes no shard at all for an empty dataset and then cannot load it back:
            # a run that rejected every row must still leave a cache that opens (with 0 pairs).
            shards = {"max_shard_size": max_shard_size} if len(kept) else {"num_shards": 1}
            kept.save_to_disk(str(tmp), **shards)
        seconds = time.perf_counter() - started
        stats = _stats(tally, seconds)
        _write_json(tmp / "stats.json", stats)
        write_checksums(tmp)
        _write_json(tmp / "manifest.json", _manifest(tok, options, source, tally, chat_template))
        replace_dir(tmp, out)
        return stats
    finally:
        shutil.rmtree(parts, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def ordered_map(fn: Callable, items: Iterable, num_proc: int, init: Callable, init_args: tuple) -> Iterator:
    """map() over processes, results in input order, at most 2 items per worker in flight."""
    if num_proc == 1:
        init(*init_args)
        yield from map(fn, items)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool across fork
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=init, initargs=init_args) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextmanager
def _quiet_datasets():
    """datasets prints its own progress bar when saving; ours already covers the run."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(rows, size)):
        yield chunk


def _with_progress(results: Iterator[ChunkResult], total: int | None, enabled: bool) -> Iterator[ChunkResult]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("preprocess"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not enabled, transient=True) as bar:
        task = bar.add_task("rows", total=total)
        for result in results:
            bar.advance(task, result.tally.rows)
            yield result


def _resolve_seed_markers(options: MaskOptions, template: str) -> MaskOptions:
    if options.mode not in ("assistant", "seed"):
        raise UsageError(f"unknown --mask-mode {options.mode!r}; use assistant or seed")
    if options.mode != "seed" or (options.user_marker and options.end_marker):
        return options
    family = seed_markers(template)
    if family is None:
        raise UsageError("--mask-mode seed: unknown template family; pass --user-marker and --end-marker")
    user, end = family
    return MaskOptions(options.mode, options.max_length, options.user_marker or user, options.end_marker or end)


def _stats(tally: Tally, seconds: float) -> dict:
    stats = asdict(tally)
    stats["reasons"] = dict(tally.reasons.most_common())
    stats["seconds"] = round(seconds, 3)
    stats["rows_per_second"] = round(tally.rows / seconds, 1) if seconds else None
    return stats


def _manifest(tok, options: MaskOptions, source, tally: Tally, chat_template) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "mtdpo_version": __version__,
        "tokenizer": {
            "name_or_path": str(tok.name_or_path),
            "fingerprint": fingerprint(tok),
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        "chat_template_sha256": sha256_text(tok.chat_template),
        "chat_template_file": str(chat_template) if chat_template else None,
        "mask_mode": options.mode,
        "seed_markers": [options.user_marker, options.end_marker] if options.mode == "seed" else None,
        "max_length": options.max_length,
        "truncation": "keep_start",
        "input": source.describe(),
        "shard": source.shard_info(),  # None, or the slice of the input (--shard I/N)
        "counts": {k: getattr(tally, k) for k in ("rows", "kept", "rejected", "dropped", "truncated")},
        "tokens": {
            k: getattr(tally, k)
            for k in ("chosen_tokens", "rejected_tokens", "chosen_trained_tokens", "rejected_trained_tokens")
        },
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
