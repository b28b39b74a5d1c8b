"""The one way a cache is written: `CacheWriter` (preprocess) and `write_reference` (precompute-ref).

A cache is written into a temporary sibling and renamed into place when complete, so an
interrupted run never leaves a directory that train would accept. Shards are written while the
records stream in, in record batches of BATCH_ROWS (as `datasets.save_to_disk` writes them, so
the bytes depend on neither chunking nor --num-proc); a new file starts at the size limit.
Reference log-probs go into a `reference/` dataset beside the token shards, never into them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pyarrow as pa

from mtdpo import compat
from mtdpo.cache.files import (
    CHECKED_FILES,
    record_checksums,
    replace_file,
    signals_held,
    write_dataset_files,
    write_json,
    writing,
)
from mtdpo.cache.manifest import MANIFEST, Manifest, ReferenceInfo
from mtdpo.cache.output import write_errors
from mtdpo.cache.schema import (
    REFERENCE_COLUMNS,
    REFERENCE_TYPE,
    STARTS_SCHEMA,
    features_of,
    pair_features,
    reference_columns,
    shift_pairs,
)

BATCH_ROWS = 1000  # records per Arrow record batch (datasets' default writer batch)
SEQUENCE_STARTS = "sequence_starts.arrow"  # where sides of several sequences split (absent: none does)
TOKENIZER = "tokenizer"  # the tokenizer copy inside a cache
REFERENCE = "reference"  # the reference log-probs beside the token shards
REJECTS = "rejects.jsonl"
STATS = "stats.json"


class ShardWriter:
    """Arrow shards written while the rows stream in. Files are named data-NNNNN-of-MMMMM.arrow,
    as save_to_disk names them, once the count is known (at close). With no row written it leaves
    one shard: the schema, no rows."""

    def __init__(self, directory: Path, max_bytes: int, features):
        self.directory, self.max_bytes, self.features = Path(directory), max_bytes, features
        self.names: list[str] = []
        self._pending: list[pa.Table] = []  # rows not yet written: fewer than BATCH_ROWS
        self._pending_rows = 0
        self._open()

    def _open(self) -> None:
        from datasets.arrow_writer import ArrowWriter

        self.names.append(f"data-{len(self.names):05d}.arrow")
        self._writer = ArrowWriter(features=self.features, path=str(self.directory / self.names[-1]))

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += len(table)
        while self._pending_rows >= BATCH_ROWS:
            self._write_batch(BATCH_ROWS)

    def _write_batch(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        batch, rest = pending.slice(0, rows), pending.slice(rows)
        self._pending, self._pending_rows = [rest], len(rest)
        written_rows, written_bytes = compat.arrow_writer_progress(self._writer)
        if written_rows and written_bytes + batch.nbytes > self.max_bytes:
            self._close_file()
            self._open()
        self._writer.write_table(batch)

    def _close_file(self) -> None:
        self._writer.finalize()
        self._writer.close()

    def close(self, complete: bool) -> list[str]:
        if complete and self._pending_rows:
            self._write_batch(self._pending_rows)
        self._close_file()
        if complete:
            final = [f"data-{i:05d}-of-{len(self.names):05d}.arrow" for i in range(len(self.names))]
            for name, new in zip(self.names, final):
                (self.directory / name).rename(self.directory / new)
            self.names = final
        return self.names


class CacheWriter:
    """Writes one cache at `out`: `write` record tables and `reject` rows as they come, then
    `finish` with the manifest and stats; the cache replaces `out` only after `finish`.

        with CacheWriter(out, max_bytes) as cache:
            cache.write(pair_table(records)); cache.reject({"row": 3, "reason": ...})
            cache.finish(manifest, stats)

    Either record kind: pass `features=kto_features()` (schema.features_of(kind)) for KTO rows;
    `finish` refuses a manifest of the other kind.
    """

    def __init__(self, out: Path, max_shard_bytes: int, features=None):
        self.out, self.max_shard_bytes, self.features = Path(out), max_shard_bytes, features or pair_features()
        self._finished = False
        self._written = 0  # records so far: where the next table's first record sits in the cache
        self._starts = None  # the sequence-starts file's writer, opened at its first row

    def __enter__(self) -> CacheWriter:
        self._stack = contextlib.ExitStack()
        try:
            with write_errors(self.out):
                self.directory = self._stack.enter_context(writing(self.out))
                self._shards = ShardWriter(self.directory, self.max_shard_bytes, self.features)
                self._rejects = self._stack.enter_context(open(self.directory / REJECTS, "w", encoding="utf-8"))
        except BaseException as err:  # no __exit__ will come: remove the temporary directory now
            self._stack.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / TOKENIZER

    def write(self, table: pa.Table, starts: pa.Table | None = None) -> None:
        """Records, and the sequence starts of those with a side of several sequences (numbered
        by their position in `table`: see schema.starts_table)."""
        with write_errors(self.out):
            self._shards.write(table)
            if starts is not None and len(starts):
                if self._starts is None:
                    self._starts = pa.ipc.new_file(str(self.directory / SEQUENCE_STARTS), STARTS_SCHEMA)
                self._starts.write_table(shift_pairs(starts, self._written))
        self._written += len(table)

    def reject(self, entry: dict) -> None:
        with write_errors(self.out):
            self._rejects.write(json.dumps(entry) + "\n")

    def keep_rejects(self, path: Path) -> None:
        """Move the rejects written so far to `path` (beside the output, for a run that writes no
        cache: its temporary directory is removed when the writer exits)."""
        with write_errors(self.out):
            self._rejects.flush()
            os.replace(self.directory / REJECTS, path)

    def finish(self, manifest: Manifest, stats: dict) -> None:
        if features_of(manifest.kind) != self.features:
            raise ValueError(f"a {manifest.kind} manifest for shards of another record kind")
        with write_errors(self.out):
            self._rejects.flush()
            names = self._shards.close(complete=True)
            extra = []
            if self._starts is not None:
                self._starts.close()
                extra.append(SEQUENCE_STARTS)
            write_json(self.directory / STATS, stats)
            manifest.write(self.directory)  # checksummed with the tokenizer copy: --verify-cache covers them
            extra += [MANIFEST, *tokenizer_files(self.directory)]
            write_dataset_files(self.directory, names, self.features, extra)
        self._finished = True

    def __exit__(self, kind, error, traceback) -> bool | None:
        if not self._finished:
            with contextlib.suppress(OSError):  # the run failed already: its own error is the one to tell
                self._shards.close(complete=False)
                if self._starts is not None:
                    self._starts.close()
            error = error or RuntimeError("CacheWriter left without finish()")
            return self._stack.__exit__(type(error), error, error.__traceback__)
        with write_errors(self.out):  # renaming the finished directory into place
            return self._stack.__exit__(kind, error, traceback)


def tokenizer_files(cache: Path) -> list[str]:
    """The files of a cache's tokenizer copy, as names under the cache (regular files only)."""
    folder = Path(cache) / TOKENIZER
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) if folder.is_dir() else []
    return [f.relative_to(cache).as_posix() for f in files]


def write_reference(
    cache: Path, manifest: Manifest, chosen: list[float], rejected: list[float], reference: ReferenceInfo
) -> Manifest:
    """Store a pair cache's reference log-probs (chosen, rejected) beside its token shards."""
    return write_reference_columns(cache, manifest, dict(zip(REFERENCE_COLUMNS, (chosen, rejected))), reference)


def write_reference_columns(
    cache: Path, manifest: Manifest, values: list[list[float]] | dict, reference: ReferenceInfo
) -> Manifest:
    """Store reference log-probs in `cache` beside its token shards, in a `reference/` dataset of
    float32 columns (the kind's `reference_columns`, in that order), row for row. The token
    shards are not touched.

    The new reference directory is renamed into place, then manifest.json and checksums.json
    (which lists both) are replaced, each atomically, with Ctrl-C and SIGTERM held until both are:
    only a kill in between leaves files that disagree with checksums.json, and that cache is
    refused naming the file (preprocess it again)."""
    from datasets import Features

    columns = reference_columns(manifest.kind)
    values = values if isinstance(values, dict) else dict(zip(columns, values))
    if list(values) != list(columns):
        raise ValueError(f"a {manifest.kind} cache's reference columns are {columns}, not {tuple(values)}")
    features = Features.from_arrow_schema(pa.schema({c: REFERENCE_TYPE for c in columns}))
    table = pa.table(values, schema=features.arrow_schema)
    with writing(Path(cache) / REFERENCE, kind="ref") as tmp:
        shards = ShardWriter(tmp, 1 << 62, features)
        shards.write(table)
        names = shards.close(complete=True)
        write_dataset_files(tmp, names, features)
    # writing() renamed tmp to cache/reference: now the two small files that name it
    updated = manifest.with_reference(reference)
    with signals_held():
        replace_file(Path(cache) / MANIFEST, updated.to_json())
        files = [f"{REFERENCE}/{name}" for name in (*names, *CHECKED_FILES)]
        record_checksums(cache, [MANIFEST, *files], replacing=REFERENCE)
    return updated
