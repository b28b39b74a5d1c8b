"""Open a preprocessed cache (shards + manifest), checked, memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

from mtdpo.errors import UsageError

SCHEMA_VERSION = 1


def read_manifest(cache: Path) -> dict:
    path = Path(cache) / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{cache} is not an mtdpo cache (no manifest.json); run `mtdpo preprocess` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is corrupt: {err}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{path}: schema version {manifest.get('schema_version')}, this mtdpo reads {SCHEMA_VERSION}")
    return manifest


def load_cache(cache: Path):
    """The shards as a memory-mapped `datasets.Dataset` (nothing is copied into RAM)."""
    import datasets

    read_manifest(cache)
    try:
        return datasets.load_from_disk(str(cache))
    except Exception as err:
        raise UsageError(f"cannot open the shards in {cache}: {type(err).__name__}: {err}".splitlines()[0]) from None
