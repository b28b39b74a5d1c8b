"""Stream rows from jsonl, json, parquet or a saved `datasets` directory.

Rows come out as (row_number, row) where row is the parsed object, or a RowError for a
line that could not be parsed, so the caller can reject it and go on. Row numbers are
0-based positions in the input (for jsonl: line number - 1, blank lines included).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from mtdpo.errors import UsageError
from mtdpo.preprocess.rows import RowError

FORMATS = ("jsonl", "json", "parquet", "arrow")
BOM = b"\xef\xbb\xbf"
MAX_INT_DIGITS = 4300  # sys.int_info.default_max_str_digits
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


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
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "arrow"
        raise UsageError(f"{path} is a directory but not a saved `datasets` dataset (no state.json)")
    if path.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[path.suffix.lower()]
    raise UsageError(f"unknown format for {path.name}; name it .jsonl/.json/.parquet or pass --format")


def _check_readable(path: Path) -> None:
    """Fail now, with the reason, rather than with a traceback half-way through the run."""
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            open(path, "rb").close()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None


def count_rows(path: Path, fmt: str) -> int:
    """Rows in the input, cheaply (for the progress bar); 0 when it holds only blank lines."""
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


def read_rows(path: Path, fmt: str) -> Iterator[tuple[int, object]]:
    if fmt == "jsonl":
        yield from _jsonl(path)
    elif fmt == "json":
        yield from enumerate(_load_json(path))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield n, row
                n += 1
    else:
        yield from enumerate(_load_arrow(path))


def _jsonl(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            # A UTF-8 byte-order mark is not part of the row; files joined with `cat` carry one
            # at the start of a later line too. CRLF line ends are JSON whitespace.
            raw = raw.removeprefix(BOM)
            if raw.strip():
                yield n, parse_line(raw)


def parse_line(raw: bytes) -> object:
    """One JSON value, or the RowError that says why the line is not one."""
    try:
        text = raw.decode("utf-8").rstrip("\r\n")  # so an error's column is on this line, not the next
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_int=_parse_int)
    except UnicodeDecodeError as err:
        return RowError(f"line is not valid UTF-8 (byte {err.start})")
    except RowError as err:
        return err
    except json.JSONDecodeError as err:
        return RowError(f"invalid JSON: {err.msg.removesuffix(' at')} at column {err.colno}")
    except RecursionError:
        return RowError("invalid JSON: nested too deeply (more levels of lists or objects than Python's recursion limit)")


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
        raise UsageError(f"cannot open {path} as a saved `datasets` dataset: {type(err).__name__}: {err}".splitlines()[0]) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UsageError(f"{path} is a DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    return ds
