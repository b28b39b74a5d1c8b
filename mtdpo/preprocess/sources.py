"""Where the rows come from: a file, a directory of files, or a `datasets` name; whole or a slice.

- A file (.jsonl, .json, .parquet) or a saved `datasets` directory: read by `read.py`.
- A directory of many .jsonl/.ndjson/.json/.parquet files (searched recursively, hidden ones
  skipped): streamed file by file in sorted path order, row numbers continuing across files, so
  the directory reads as the files concatenated. Rejects name the file and the row inside it.
- Anything that is not an existing path and looks like a hub name (`owner/name`):
  `datasets.load_dataset(name, split=split, streaming=True)`, streamed row by row.

`--shard I/N` keeps the contiguous rows [I*total//N, (I+1)*total//N) of the whole input, with
their global row numbers, so N machines can each preprocess one slice; the caches of slices
0..N-1 concatenated in order hold exactly the pairs of one run over the whole input.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from mtdpo.errors import UsageError
from mtdpo.preprocess.read import BOM, count_rows, detect_format, parse_line, read_rows
from mtdpo.tokenizer import sha256_path

DIRECTORY_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class InputFile:
    path: Path
    name: str  # relative to the input directory (the file itself for a one-file input)
    fmt: str
    first_row: int = 0  # global row number of its first row
    rows: int = 0


@dataclass
class Source:
    """The input as one stream of (global row number, row), or the slice that --shard keeps."""

    spec: str  # the input as given
    fmt: str  # jsonl, json, parquet, arrow; "directory" or "hub"
    files: list[InputFile] = field(default_factory=list)  # empty for a hub dataset
    split: str | None = None  # hub datasets only
    hub: object = None  # the streamed datasets.IterableDataset
    shard: tuple[int, int] | None = None  # (index, count)
    total: int | None = None  # rows of the whole input, once counted (None: a stream that does not say)
    start: int = 0  # the slice read: [start, stop)
    stop: int | None = None

    @property
    def rows(self) -> int | None:
        """Rows this run reads (row numbers, blank jsonl lines included)."""
        return None if self.stop is None else self.stop - self.start

    def count(self) -> None:
        """Count the rows of the whole input and fix the slice --shard asks for."""
        if self.hub is None:
            for file in self.files:
                file.first_row = self.total or 0
                file.rows = count_rows(file.path, file.fmt)
                self.total = file.first_row + file.rows
        else:
            self.total = _announced_rows(self.hub, self.split)
        if self.shard is None:
            self.stop = self.total
        elif self.total is None:
            raise UsageError(
                f"--shard needs the row count of the input, which the streamed dataset {self.spec} does not give; "
                "download its files and pass the directory instead"
            )
        else:
            index, count = self.shard
            self.start, self.stop = index * self.total // count, (index + 1) * self.total // count

    def read(self) -> Iterator[tuple[int, object]]:
        """(global row number, row) for the rows of the slice, in input order."""
        if self.hub is not None:
            yield from islice(enumerate(self.hub), self.start, self.stop)
            return
        for file in self.files:
            first, end = file.first_row, file.first_row + file.rows
            start, stop = max(self.start, first) - first, min(self.stop, end) - first  # numbered within the file
            if start >= stop:
                continue  # the slice holds none of this file: not opened
            rows = read_rows(file.path, file.fmt) if (start, stop) == (0, file.rows) else read_slice(file, start, stop)
            for n, row in rows:
                yield file.first_row + n, row

    def where(self, row: int) -> dict:
        """{"file": name, "file_row": n} for a row of a directory input (for rejects); {} otherwise."""
        if self.fmt != "directory":
            return {}
        file = self.files[bisect.bisect_right([f.first_row for f in self.files], row) - 1]
        return {"file": file.name, "file_row": row - file.first_row}

    def describe(self) -> dict:
        """The manifest's "input": what was read, with a content hash where there is one."""
        info = {"path": self.spec, "format": self.fmt, "sha256": None}
        if self.hub is not None:
            info["split"] = self.split
        else:
            info["sha256"] = _sha256_files(self.files)
        if self.fmt == "directory":
            info["files"] = [{"name": f.name, "format": f.fmt, "first_row": f.first_row, "rows": f.rows} for f in self.files]
        return info

    def shard_info(self) -> dict | None:
        """The manifest's "shard": which slice of the input this cache holds (None: all of it)."""
        if self.shard is None:
            return None
        return {"index": self.shard[0], "count": self.shard[1], "rows": [self.start, self.stop], "input_rows": self.total}


def open_source(spec: str | Path, fmt: str = "auto", split: str = "train", shard: str | None = None) -> Source:
    """Find out what the input is (cheap: nothing is counted or read yet)."""
    parsed = parse_shard(shard)
    path = Path(spec)
    if path.is_dir() and fmt == "auto" and not _is_saved_dataset(path):
        files = data_files(path)
        if files:
            return Source(str(spec), "directory", files, shard=parsed)
    if not path.exists() and fmt == "auto" and _looks_like_hub_name(str(spec)):
        return Source(str(spec), "hub", split=split, hub=_load_hub(str(spec), split), shard=parsed)
    fmt = detect_format(path, fmt)  # a missing path, a wrong --format … say so here
    return Source(str(spec), fmt, [InputFile(path, path.name, fmt)], shard=parsed)


def read_slice(file: InputFile, start: int, stop: int) -> Iterator[tuple[int, object]]:
    """Rows [start, stop) of one file, numbered within it. The jsonl lines and parquet batches
    before the slice are skipped unparsed (the last of 100 machines would otherwise parse 99% of
    the input for nothing); the rows inside go through read.py's own parser, as in `read_rows`."""
    if file.fmt == "jsonl":
        with open(file.path, "rb") as f:
            for n, raw in islice(enumerate(f), start, stop):
                raw = raw.removeprefix(BOM)  # as read.py's _jsonl: a BOM on any line, blank lines skipped
                if raw.strip():
                    yield n, parse_line(raw)
    elif file.fmt == "parquet":
        import pyarrow.parquet as pq

        first = 0  # row number of the batch's first row
        for batch in pq.ParquetFile(file.path).iter_batches(batch_size=1024):
            lo, hi = max(start - first, 0), min(stop - first, batch.num_rows)
            if lo < hi:
                yield from enumerate(batch.slice(lo, hi - lo).to_pylist(), first + lo)
            first += batch.num_rows
            if first >= stop:
                return
    else:  # json and saved datasets: loaded whole by read.py anyway
        for n, row in read_rows(file.path, file.fmt):
            if n >= stop:
                return
            if n >= start:
                yield n, row


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not match or not int(match[1]) < int(match[2]):
        raise UsageError(f"--shard takes I/N with 0 <= I < N (e.g. 0/4 for the first of four slices), not {shard!r}")
    return int(match[1]), int(match[2])


def data_files(directory: Path) -> list[InputFile]:
    """The .jsonl/.ndjson/.json/.parquet files under a directory, sorted by path; hidden ones skipped."""
    files = []
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory)
        if path.is_file() and path.suffix.lower() in DIRECTORY_SUFFIXES and not any(p.startswith(".") for p in name.parts):
            files.append(InputFile(path, name.as_posix(), DIRECTORY_SUFFIXES[path.suffix.lower()]))
    return files


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "state.json").exists()


def _looks_like_hub_name(spec: str) -> bool:
    """`owner/name` or `name`, not a path a user meant to be local (./x, /x, x.jsonl)."""
    return bool(HUB_NAME.match(spec)) and Path(spec).suffix.lower() not in (*DIRECTORY_SUFFIXES, ".arrow", ".txt", ".csv")


def _load_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # offline, no such dataset, no such split: datasets raises many kinds
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise UsageError(f"input not found: {name} is not a local path, and `datasets` cannot load it ({reason})") from None


def _announced_rows(dataset, split: str) -> int | None:
    """The row count a hub dataset's metadata gives for the split, if any."""
    splits = getattr(getattr(dataset, "info", None), "splits", None) or {}
    info = splits.get(split) if hasattr(splits, "get") else None
    return getattr(info, "num_examples", None) or None


def _sha256_files(files: list[InputFile]) -> str:
    """The input's content hash: the file's (as before), or a hash of each file's name and hash."""
    if len(files) == 1 and files[0].name == files[0].path.name:
        return sha256_path(files[0].path)
    lines = "".join(f"{file.name}\0{sha256_path(file.path)}\n" for file in files)
    return hashlib.sha256(lines.encode()).hexdigest()
