"""Stream rows from jsonl, json, parquet or a saved `datasets` directory.

Rows come out as (row_number, row) where row is the parsed object, or a RowError for a
line that could not be parsed, so the caller can reject it and go on. Row numbers are
0-based positions in the input (for jsonl: line number - 1, blank lines included).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mtdpo.errors import UsageError
from mtdpo.preprocess.rows import RowError

FORMATS = ("jsonl", "json", "parquet", "arrow")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def detect_format(path: Path, fmt: str = "auto") -> str:
    if not path.exists():
        raise UsageError(f"input not found: {path}")
    if fmt != "auto":
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; use one of: auto, {', '.join(FORMATS)}")
        return fmt
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "arrow"
        raise UsageError(f"{path} is a directory but not a saved `datasets` dataset (no state.json)")
    if path.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[path.suffix.lower()]
    raise UsageError(f"unknown format for {path.name}; name it .jsonl/.json/.parquet or pass --format")


def count_rows(path: Path, fmt: str) -> int:
    """Rows in the input, cheaply (for the progress bar)."""
    if fmt == "jsonl":
        lines, last = 0, b"\n"
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                lines, last = lines + block.count(b"\n"), block[-1:]
        return lines + (last != b"\n")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
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
            if n == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark is not part of the first row
            if not raw.strip():
                continue
            try:
                yield n, json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
            except UnicodeDecodeError as err:
                yield n, RowError(f"line is not valid UTF-8 (byte {err.start})")
            except RowError as err:
                yield n, err
            except json.JSONDecodeError as err:
                yield n, RowError(f"invalid JSON: {err.msg} at column {err.colno}")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise RowError(f"duplicated key(s) in one object: {', '.join(dupes)}")
    return dict(pairs)


def _load_json(path: Path) -> list:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}); for one object per line name it .jsonl") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UsageError(f"{path} must hold a JSON list of rows")
    return data


def _load_arrow(path: Path):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UsageError(f"{path} is a DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    return ds
