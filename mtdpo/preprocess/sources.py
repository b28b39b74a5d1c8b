"""Where the rows come from: a file, a directory of files, or a `datasets` name; whole or a slice.

- A file (.jsonl/.ndjson, .json, .parquet) or a saved `datasets` directory.
- A directory of many such files (searched recursively, hidden ones skipped): streamed file by
  file in sorted path order, row numbers continuing across files, so the directory reads as the
  files concatenated. Rejects name the file and the row inside it.
- Anything that is not an existing path and looks like a hub name (`owner/name`):
  `datasets.load_dataset(name, split=split, streaming=True)`, streamed row by row.

Rows come out as (row number, row): the parsed object, or a RowError for a line that could not
be parsed, so the caller can reject it and go on. Row numbers are 0-based positions in the whole
input (for jsonl: line number - 1, blank lines included).

`--shard I/N` keeps the contiguous rows [I*total//N, (I+1)*total//N) of the whole input, with
their global row numbers, so N machines can each preprocess one slice; the caches of slices
0..N-1 concatenated in order hold exactly the pairs of one run over the whole input.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from mtdpo import hub
from mtdpo.errors import UsageError
from mtdpo.fingerprint import sha256_file, sha256_files
from mtdpo.preprocess.rows import RowError

# File suffix -> format; "arrow" is a saved `datasets` directory, never a file in a directory input.
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
FORMATS = ("jsonl", "json", "parquet", "arrow")
BOM = b"\xef\xbb\xbf"
MAX_INT_DIGITS = 4300  # sys.int_info.default_max_str_digits


# ── one reader per format, each for rows [start, stop) numbered within the file ──────────────


def read_jsonl(path: Path, start: int = 0, stop: int | None = None, parse: bool = True) -> Iterator[tuple[int, object]]:
    """Lines before the slice are skipped unparsed (the last of 100 machines would otherwise
    parse 99% of the input for nothing). With parse=False the lines come out as bytes, for
    worker processes to parse (see `parse_line`): the main process then only reads."""
    with open(path, "rb") as f:
        for n, raw in islice(enumerate(f), start, stop):
            # A UTF-8 byte-order mark is not part of the row; files joined with `cat` carry one
            # at the start of a later line too. CRLF line ends are JSON whitespace.
            raw = raw.removeprefix(BOM)
            if raw.strip():
                yield n, parse_line(raw) if parse else raw


def read_parquet(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, object]]:
    """Batches before the slice are skipped without converting them to Python."""
    import pyarrow.parquet as pq

    first = 0  # row number of the batch's first row
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        lo, hi = max(start - first, 0), batch.num_rows if stop is None else min(stop - first, batch.num_rows)
        if lo < hi:
            yield from enumerate(batch.slice(lo, hi - lo).to_pylist(), first + lo)
        first += batch.num_rows
        if stop is not None and first >= stop:
            return


def read_json(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, object]]:
    rows = _load_json(path)  # one JSON document: it is parsed whole anyway
    yield from islice(enumerate(rows), start, stop)


def read_arrow(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, object]]:
    rows = _load_arrow(path)
    yield from islice(enumerate(rows), start, stop)


READERS = {"jsonl": read_jsonl, "json": read_json, "parquet": read_parquet, "arrow": read_arrow}


def count_rows(path: Path, fmt: str) -> int:
    """Rows in one file, cheaply; 0 when it holds only blank lines."""
    if fmt == "jsonl":
        lines, last, blank = 0, b"\n", True
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                lines, last = lines + block.count(b"\n"), block[-1:]
                blank = blank and not block.replace(BOM, b"").strip()
        return 0 if blank else lines + (last != b"\n")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # pyarrow's ArrowInvalid / OSError for a damaged or foreign file
            raise UsageError(f"{path} is not a readable parquet file ({err})".splitlines()[0]) from None
    if fmt == "arrow":
        return len(_load_arrow(path))
    return len(_load_json(path))


def parse_line(raw: bytes) -> object:
    """One JSON value, or the RowError that says why the line is not one."""
    try:
        text = raw.decode("utf-8").rstrip("\r\n")  # so an error's column is on this line, not the next
        if text.startswith("\ufeff"):  # as json.loads says it (a second BOM: only one is stripped)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except UnicodeDecodeError as err:
        return RowError(f"line is not valid UTF-8 (byte {err.start})")
    except RowError as err:
        return err
    except json.JSONDecodeError as err:
        return RowError(f"invalid JSON: {err.msg.removesuffix(' at')} at column {err.colno}")
    except RecursionError:
        return RowError(
            "invalid JSON: nested too deeply (more levels of lists or objects than Python's recursion limit)"
        )


def _parse_int(digits: str) -> int:
    # Python refuses to convert more than 4,300 digits (a ValueError deep inside json).
    if len(digits) > MAX_INT_DIGITS:
        raise RowError(f"invalid JSON: a number has {len(digits):,} digits, more than {MAX_INT_DIGITS:,}")
    return int(digits)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json keeps the last of two equal keys without a word; which side was meant is unknown.
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        dupes = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise RowError(f"duplicated key(s) in one object: {', '.join(dupes)}")
    return obj


# Built once: json.loads(text, **hooks) would build a decoder and its scanner for every line.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_int=_parse_int)


def _load_json(path: Path) -> list:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit number
        raise UsageError(f"{path} is not valid JSON ({err}); for one object per line name it .jsonl") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UsageError(f"{path} must hold a JSON list of rows")
    return data


def _load_arrow(path: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged or foreign directory: datasets raises many kinds
        raise UsageError(
            f"cannot open {path} as a saved `datasets` dataset: {type(err).__name__}: {err}".splitlines()[0]
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UsageError(f"{path} is a DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    return ds


# ── the input as a whole ─────────────────────────────────────────────────────────────────────


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

    def count_rows(self) -> int | None:
        """Count the rows of the whole input (each file's, for global row numbers) and return the total."""
        if self.hub is None:
            self.total = 0
            for file in self.files:
                file.first_row, file.rows = self.total, count_rows(file.path, file.fmt)
                self.total += file.rows
        else:
            self.total = _announced_rows(self.hub, self.split)
            if self.shard is not None and self.total is None:
                raise UsageError(
                    f"--shard needs the row count of the input, which the streamed dataset {self.spec} does not give; "
                    "download its files and pass the directory instead"
                )
        return self.total

    @property
    def row_range(self) -> range | None:
        """Row numbers this run reads (blank jsonl lines included): all, or the --shard slice.
        None for a stream of unknown length read whole."""
        if self.total is None:
            return None
        if self.shard is None:
            return range(self.total)
        index, count = self.shard
        return range(index * self.total // count, (index + 1) * self.total // count)

    @property
    def rows(self) -> int | None:
        return None if self.row_range is None else len(self.row_range)

    def read(self, parse: bool = True) -> Iterator[tuple[int, object]]:
        """(global row number, row) for the rows of the slice, in input order; with parse=False,
        jsonl rows are the line's bytes (to be parsed by `parse_line`)."""
        wanted = self.row_range
        if self.hub is not None:
            yield from islice(enumerate(self.hub), wanted.start if wanted else 0, wanted.stop if wanted else None)
            return
        if wanted is None:
            raise RuntimeError("Source.read() before count_rows()")
        for file in self.files:
            start = max(wanted.start - file.first_row, 0)  # numbered within the file
            stop = min(wanted.stop - file.first_row, file.rows)
            if start >= stop:
                continue  # the slice holds none of this file: not opened
            rows = (
                read_jsonl(file.path, start, stop, parse)
                if file.fmt == "jsonl"
                else READERS[file.fmt](file.path, start, stop)
            )
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
            info["sha256"] = self.sha256()
        if self.fmt == "directory":
            info["files"] = [
                {"name": f.name, "format": f.fmt, "first_row": f.first_row, "rows": f.rows} for f in self.files
            ]
        return info

    def sha256(self) -> str:
        """The input's content hash: a file's bytes, or every file under the input with its name."""
        if self.fmt == "directory":
            return sha256_files([f.path for f in self.files], Path(self.spec))
        path = self.files[0].path
        if path.is_dir():  # a saved datasets directory
            return sha256_files(sorted(p for p in path.rglob("*") if p.is_file()), path)
        return sha256_file(path)

    def shard_info(self) -> dict | None:
        """The manifest's "shard": which slice of the input this cache holds (None: all of it)."""
        if self.shard is None:
            return None
        wanted = self.row_range
        return {
            "index": self.shard[0],
            "count": self.shard[1],
            "rows": [wanted.start, wanted.stop],
            "input_rows": self.total,
        }


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


def detect_format(path: Path, fmt: str = "auto") -> str:
    if not path.exists():
        raise UsageError(f"input not found: {path}")
    _check_readable(path)
    if fmt != "auto":
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; use one of: auto, {', '.join(FORMATS)}")
        if path.is_dir() != (fmt == "arrow"):
            kind = "a saved `datasets` directory" if fmt == "arrow" else "a file"
            raise UsageError(f"{path} is {'a directory' if path.is_dir() else 'a file'}; --format {fmt} reads {kind}")
        return fmt
    if path.is_dir():
        if _is_saved_dataset(path):
            return "arrow"
        raise UsageError(f"{path} is a directory but not a saved `datasets` dataset (no state.json)")
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    raise UsageError(f"unknown format for {path.name}; name it .jsonl/.json/.parquet or pass --format")


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not match or not int(match[1]) < int(match[2]):
        raise UsageError(f"--shard takes I/N with 0 <= I < N (e.g. 0/4 for the first of four slices), not {shard!r}")
    return int(match[1]), int(match[2])


def default_output(spec: str | Path, shard: str | None = None) -> Path:
    """data_cache/NAME, or one per slice that sorts in order: data_cache/NAME-shard-03-of-12."""
    parsed = parse_shard(shard)
    name = Path(spec).stem
    if parsed:
        index, count = parsed
        name += f"-shard-{index:0{len(str(count))}d}-of-{count}"
    return Path("data_cache") / name


def data_files(directory: Path) -> list[InputFile]:
    """The .jsonl/.ndjson/.json/.parquet files under a directory, sorted by path; hidden ones skipped."""
    files = []
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory)
        if path.is_file() and path.suffix.lower() in SUFFIXES and not any(p.startswith(".") for p in name.parts):
            files.append(InputFile(path, name.as_posix(), SUFFIXES[path.suffix.lower()]))
    return files


def _check_readable(path: Path) -> None:
    """Fail now, with the reason, rather than with a traceback half-way through the run."""
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            open(path, "rb").close()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "state.json").exists()


def _looks_like_hub_name(spec: str) -> bool:
    """`owner/name` or `name`, not a path a user meant to be local (./x, /x, x.jsonl)."""
    return bool(hub.HUB_NAME.match(spec)) and Path(spec).suffix.lower() not in (*SUFFIXES, ".arrow", ".txt", ".csv")


def _load_hub(name: str, split: str):
    import datasets

    # Streamed from the hub itself, no cache to fall back on. (Offline mode: `datasets` says so at once.)
    if not hub.offline_mode() and (reason := hub.probe()):
        raise hub.no_network("input", name, reason, cache_searched=False)
    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # offline, no such dataset, no such split: datasets raises many kinds
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise UsageError(
            f"input not found: {name} is not a local path, and `datasets` cannot load it ({reason})"
        ) from None


def _announced_rows(dataset, split: str) -> int | None:
    """The row count a hub dataset's metadata gives for the split, if any."""
    splits = getattr(getattr(dataset, "info", None), "splits", None) or {}
    info = splits.get(split) if hasattr(splits, "get") else None
    return getattr(info, "num_examples", None) or None
