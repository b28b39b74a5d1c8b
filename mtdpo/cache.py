"""Open a preprocessed cache (shards + manifest), checked, memory-mapped.

Nothing in a cache is executed or unpickled: the manifest, state.json and checksums.json are
JSON, the shards are Arrow IPC streams. Every problem is a UsageError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from mtdpo.errors import UsageError
from mtdpo.tokenizer import sha256_path

SCHEMA_VERSION = 1
CHECKSUMS = "checksums.json"  # sizes and SHA-256 of the files below, written by preprocess
# Plus every data-*.arrow shard. Not state.json: datasets puts a random fingerprint in it, and
# checksums.json should be byte-equal when the shards are (state.json is parsed on load anyway).
CHECKED_FILES = ("dataset_info.json",)
# Size and modification time of those files when their SHA-256 last matched checksums.json: train
# re-hashes only files that changed since (O(1) start-up), `--verify-cache` re-hashes all.
STAMP = "verified.json"
COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "prompt_len", "row")
MANIFEST_KEYS = (
    ("tokenizer", "fingerprint"), ("tokenizer", "vocab_size"), ("tokenizer", "pad_token_id"),
    ("chat_template_sha256",), ("mask_mode",), ("max_length",), ("counts", "kept"),
)  # fmt: skip
# Siblings a run writes before renaming into place (.NAME.incomplete-PID …): never a cache.
TEMPORARY_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>incomplete|parts|old|ref)-(?P<pid>\d+)$")


def read_manifest(cache: Path) -> dict:
    cache = Path(cache)
    if TEMPORARY_DIR.match(cache.name):
        raise UsageError(f"{cache} is the temporary directory of an unfinished or interrupted run, not a cache; run `mtdpo preprocess` again")
    path = cache / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{cache} is not an mtdpo cache (no manifest.json); run `mtdpo preprocess` first")
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise UsageError(f"{path}: schema version {version}, this mtdpo reads {SCHEMA_VERSION}")
    for keys in MANIFEST_KEYS:
        value = manifest
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None and keys != ("tokenizer", "pad_token_id"):  # a tokenizer may have no pad token
            raise UsageError(f"{path} is corrupt: it lacks {'.'.join(keys)}")
    return manifest


def load_cache(cache: Path, verify: bool = False, full: bool = False):
    """The shards as a memory-mapped `datasets.Dataset` (nothing is copied into RAM).

    Sizes are always checked against checksums.json. `verify` also compares SHA-256 for the
    files whose size or modification time changed since their last verification (none, for a
    cache as preprocess left it); `full` re-hashes every file (about a second per GB).
    """
    import datasets

    cache = Path(cache)
    manifest = read_manifest(cache)
    for shard in shard_files(cache):
        _check_shard(shard)
    check_files(cache, verify, full)
    try:
        ds = datasets.load_from_disk(str(cache))
    except Exception as err:
        raise UsageError(f"cannot open the shards in {cache}: {type(err).__name__}: {err}".splitlines()[0]) from None
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise UsageError(f"the shards in {cache} lack the column(s) {', '.join(missing)}; preprocess again")
    if len(ds) != manifest["counts"]["kept"]:
        raise UsageError(f"the shards in {cache} hold {len(ds):,} pairs but manifest.json says {manifest['counts']['kept']:,}")
    return ds


def shard_files(cache: Path) -> list[Path]:
    """The Arrow files listed in state.json, each checked to exist."""
    state = _read_json(Path(cache) / "state.json")
    try:
        names = [entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError):
        raise UsageError(f"{Path(cache) / 'state.json'} is corrupt: it lists no _data_files") from None
    shards = [Path(cache) / name for name in names]
    for shard in shards:
        if not shard.is_file():
            raise UsageError(f"shard {shard} is missing")
    return shards


def _check_shard(shard: Path) -> None:
    import pyarrow as pa

    try:
        with pa.memory_map(str(shard)) as source:
            pa.ipc.open_stream(source).read_all()  # memory-mapped: reads the batch headers only
    except (pa.ArrowException, OSError) as err:
        raise UsageError(f"shard {shard} is truncated or corrupt ({err})".splitlines()[0]) from None


def write_checksums(directory: Path) -> None:
    """Record size and SHA-256 of the shards and datasets' JSON files (preprocess, at the end)."""
    names = [*sorted(p.name for p in Path(directory).glob("data-*.arrow")), *CHECKED_FILES]
    sums = {name: {"bytes": (Path(directory) / name).stat().st_size, "sha256": sha256_path(Path(directory) / name)} for name in names}
    (Path(directory) / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n")
    write_stamp(directory)


def check_files(cache: Path, verify: bool, full: bool = False) -> None:
    """Compare the files with checksums.json (absent in caches rewritten by other tools: skipped)."""
    path = Path(cache) / CHECKSUMS
    if not path.is_file():
        return
    sums = _read_json(path)
    for name, expected in sums.items():
        file = Path(cache) / name
        if not file.is_file():
            raise UsageError(f"{file} is missing (listed in {CHECKSUMS})")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise UsageError(f"{file} is truncated or changed: {size:,} bytes, {CHECKSUMS} says {expected['bytes']:,}")
    if not (verify or full) or (not full and _stamp(cache) == _read_stamp(cache)):
        return
    for name, expected in sums.items():
        if sha256_path(Path(cache) / name) != expected["sha256"]:
            raise UsageError(f"{Path(cache) / name} is corrupt: its SHA-256 differs from the one in {CHECKSUMS}")
    write_stamp(cache)


def write_stamp(cache: Path) -> None:
    """Note that the files, as they are now, match checksums.json (best effort: a read-only
    cache is simply verified in full at every start)."""
    tmp = Path(cache) / f".{STAMP}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(_stamp(cache), indent=2) + "\n")
        tmp.replace(Path(cache) / STAMP)  # atomic: ranks of one job may stamp the same cache at once
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _stamp(cache: Path) -> dict:
    """What changes when a file is rewritten: its size and modification time, and checksums.json."""
    stats = {name: Path(cache, name).stat() for name in [CHECKSUMS, *_read_json(Path(cache) / CHECKSUMS)]}
    return {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}


def _read_stamp(cache: Path) -> dict | None:
    try:
        return json.loads((Path(cache) / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no stamp or a damaged one: verify in full


def remove_stale_runs(out: Path) -> list[Path]:
    """Delete the temporary siblings of `out` left by runs that were killed (their PID is gone)."""
    removed = []
    for sibling in Path(out).parent.glob(f".{Path(out).name}.*-*"):
        match = TEMPORARY_DIR.match(sibling.name)
        if match and match["name"] == Path(out).name and not _alive(int(match["pid"])):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is corrupt: {err}") from None


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename a finished directory into place; an old one at `out` goes only then."""
    import os
    import shutil

    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
