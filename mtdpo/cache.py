"""The cache contract, in one place: what a cache holds, how it is written, how it is opened.

A cache is a directory that `datasets.load_from_disk` opens: Arrow shards of the columns below,
manifest.json (what made it), checksums.json (each file's size and SHA-256), stats.json,
rejects.jsonl and a copy of the tokenizer (docs/DESIGN.md, "The cache contract"). It is written
into a temporary sibling and renamed into place when complete (`writing`), so an interrupted
run never leaves a directory that train would accept.

Nothing in a cache is executed or unpickled: the manifest, state.json and checksums.json are
JSON, the shards are Arrow IPC streams. Every problem is a UsageError naming the file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from mtdpo import __version__
from mtdpo.errors import UsageError
from mtdpo.tokenizer import (
    EMBEDDED_TOKENIZER,
    fingerprint_dir,
    same_tokenizer,
    sha256_path,
    sha256_text,
    vocabulary_hash,
)

SCHEMA_VERSION = 1
IGNORE_INDEX = -100  # the label of every token that is not trained
# Schema 1: column -> Arrow type. Token lists are int32, lengths int32, the source row int64.
COLUMN_TYPES = {
    "chosen_input_ids": "list<int32>",
    "chosen_labels": "list<int32>",
    "rejected_input_ids": "list<int32>",
    "rejected_labels": "list<int32>",
    "prompt_len": "int32",  # tokens both sequences share before they diverge
    "chosen_len": "int32",  # sequence lengths, for length grouping without reading the lists
    "rejected_len": "int32",
    "row": "int64",  # the source row
}
COLUMNS = (
    "chosen_input_ids",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_labels",
    "prompt_len",
    "row",
)  # required
REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")  # optional float32, written by precompute-ref
MANIFEST_KEYS = (
    ("tokenizer", "fingerprint"),
    ("tokenizer", "vocab_size"),
    ("tokenizer", "pad_token_id"),
    ("chat_template_sha256",),
    ("mask_mode",),
    ("max_length",),
    ("counts", "kept"),
)
# Manifest fields that must agree for several caches to be one dataset (the tokenizer is
# compared on its own: two fingerprints may name one tokenizer).
COMPATIBLE_FIELDS = (("chat_template_sha256",), ("mask_mode",), ("seed_markers",), ("max_length",))
CHECKSUMS = "checksums.json"  # sizes and SHA-256 of the files below, written by preprocess
# Plus every data-*.arrow shard. Not state.json: datasets puts a random fingerprint in it, and
# checksums.json should be byte-equal when the shards are (state.json is parsed on load anyway).
CHECKED_FILES = ("dataset_info.json",)
# Size and modification time of those files when their SHA-256 last matched checksums.json: train
# re-hashes only files that changed since (O(1) start-up), `--verify-cache` re-hashes all.
STAMP = "verified.json"
# Siblings a run writes before renaming into place (.NAME.incomplete-PID …): never a cache.
TEMPORARY_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>incomplete|parts|old|ref)-(?P<pid>\d+)$")


def features():
    """The schema as `datasets.Features` (for the writers)."""
    from datasets import Features, List, Value

    def feature(kind: str):
        return List(Value(kind[5:-1])) if kind.startswith("list<") else Value(kind)

    return Features({name: feature(kind) for name, kind in COLUMN_TYPES.items()})


# ── writing ───────────────────────────────────────────────────────────────────


def build_manifest(tok, saved_tokenizer: Path, options, source, tally, chat_template) -> dict:
    """manifest.json of a new cache: the tokenizer, template and mask options that made it, the
    input and its slice, counts and token totals."""
    return {
        "schema_version": SCHEMA_VERSION,
        "mtdpo_version": __version__,
        "tokenizer": {
            "name_or_path": str(tok.name_or_path),
            # The saved copy's bytes (what train compares first); a vocabulary hash if none was written.
            "fingerprint": fingerprint_dir(saved_tokenizer) or vocabulary_hash(tok),
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


@contextlib.contextmanager
def writing(out: Path, kind: str = "incomplete") -> Iterator[Path]:
    """Write a cache atomically: yields an empty temporary sibling of `out` (.NAME.KIND-PID),
    which replaces `out` only if the block finishes; on any error it is removed and `out` is
    left as it was. Siblings of killed runs (their PID gone) are cleared first."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{kind}-{os.getpid()}")
    remove_stale_runs(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ── opening ───────────────────────────────────────────────────────────────────


def read_manifest(cache: Path) -> dict:
    cache = Path(cache)
    if TEMPORARY_DIR.match(cache.name):
        raise UsageError(
            f"{cache} is the temporary directory of an unfinished or interrupted run, not a cache; run `mtdpo preprocess` again"
        )
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
    shards = shard_files(cache)
    verified = as_verified(cache)
    if not verified:  # a file changed since it was hashed: see that every shard reads to its end
        for shard in shards:
            _check_shard(shard)
    check_files(cache, rehash=full or (verify and not verified))
    try:
        ds = datasets.load_from_disk(str(cache))
    except Exception as err:
        raise UsageError(f"cannot open the shards in {cache}: {type(err).__name__}: {err}".splitlines()[0]) from None
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise UsageError(f"the shards in {cache} lack the column(s) {', '.join(missing)}; preprocess again")
    if len(ds) != manifest["counts"]["kept"]:
        raise UsageError(
            f"the shards in {cache} hold {len(ds):,} pairs but manifest.json says {manifest['counts']['kept']:,}"
        )
    return ds


def expand_cache_paths(paths: list[str]) -> list[str]:
    """--data entries are cache directories or quoted glob patterns (`'data_cache/big-shard-*'`),
    a pattern standing for its matches sorted by name."""
    expanded = []
    for path in paths:
        if Path(path).exists() or not any(c in path for c in "*?["):
            expanded.append(path)
        elif matches := sorted(glob.glob(path)):
            expanded.extend(matches)
        else:
            raise UsageError(f"--data {path}: no cache matches this pattern")
    return expanded


def open_caches(paths: list[str], verify_all: bool = False):
    """One memory-mapped dataset from one or more caches whose manifests agree.

    Shards are re-hashed only if they changed since their last verification, or all of them
    with `verify_all` (`--verify-cache`), so start-up does not grow with the data."""
    from datasets import concatenate_datasets

    manifests = [read_manifest(Path(p)) for p in paths]
    fingerprint = manifests[0]["tokenizer"]["fingerprint"]
    for path, manifest in zip(paths[1:], manifests[1:]):
        if manifest["tokenizer"]["fingerprint"] != fingerprint and not same_tokenizer(
            fingerprint, Path(paths[0]) / "tokenizer", Path(path) / "tokenizer"
        ):
            raise UsageError(f"caches {paths[0]} and {path} disagree on tokenizer.fingerprint; preprocess them alike")
        for keys in COMPATIBLE_FIELDS:
            if _get(manifest, keys) != _get(manifests[0], keys):
                raise UsageError(f"caches {paths[0]} and {path} disagree on {'.'.join(keys)}; preprocess them alike")
    slices = {}  # (input hash, shard) -> the first cache holding that slice of that input
    for path, manifest in zip(paths, manifests):
        if shard := manifest.get("shard"):
            source = manifest["input"].get("sha256") or manifest["input"].get("path")  # a hub dataset has no hash
            key = (source, shard["index"], shard["count"])
            if key in slices:
                raise UsageError(
                    f"caches {slices[key]} and {path} are the same slice ({shard['index']}/{shard['count']}) of one input; pass each once"
                )
            slices[key] = path
    datasets = [load_cache(Path(p), verify=True, full=verify_all) for p in paths]
    for path, manifest, dataset in zip(paths, manifests, datasets):
        if len(dataset) == 0:
            counts = manifest.get("counts", {})
            raise UsageError(
                f"cache {path} holds no pairs (kept {counts.get('kept', 0)} of {counts.get('rows', '?')} rows; see {Path(path) / 'rejects.jsonl'})"
            )
    check_reference_columns(paths, datasets)  # the collator cannot mix batches with and without them
    return (datasets[0] if len(datasets) == 1 else concatenate_datasets(datasets)), manifests[0]


def _get(d: dict, keys: tuple[str, ...]):
    for key in keys:
        d = d.get(key, {}) if isinstance(d, dict) else None
    return d


def check_model_matches(
    manifest: dict, model_path: str | None, vocab_size: int, allow_mismatch: bool, cache: Path
) -> None:
    """Refuse a model whose tokenizer is not the one the cache was tokenized with."""
    cache_vocab = manifest["tokenizer"]["vocab_size"]
    if cache_vocab > vocab_size:
        hint = " (the tiny default model fits only the embedded tokenizer; pass --model)" if model_path is None else ""
        raise UsageError(
            f"the cache uses token ids up to {cache_vocab - 1} but the model's vocabulary has {vocab_size}{hint}"
        )
    tokenizer_dir = EMBEDDED_TOKENIZER if model_path is None else Path(model_path)
    fingerprint = manifest["tokenizer"]["fingerprint"]
    if (
        (tokenizer_dir / "tokenizer.json").is_file()
        and not allow_mismatch
        and not same_tokenizer(fingerprint, Path(cache) / "tokenizer", tokenizer_dir)
    ):
        raise UsageError(
            f"the model's tokenizer ({tokenizer_dir}) differs from the cache's ({manifest['tokenizer']['name_or_path']}): "
            "re-run `mtdpo preprocess --tokenizer` with the model's tokenizer, or pass --allow-mismatch"
        )


def has_reference_columns(dataset) -> bool:
    return set(REF_COLUMNS) <= set(dataset.column_names)


def check_reference_columns(paths: list[str], datasets: list) -> None:
    """The caches of one dataset either all hold reference log-probs or none does."""
    with_columns = [p for p, ds in zip(paths, datasets) if has_reference_columns(ds)]
    without = [p for p, ds in zip(paths, datasets) if not has_reference_columns(ds)]
    if with_columns and without:
        raise UsageError(
            f"caches {with_columns[0]} and {without[0]}: the first holds precomputed reference log-probs, the second none; "
            f"run `mtdpo precompute-ref {without[0]}` with the same reference, or pass caches of one kind"
        )


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
    sums = {
        name: {"bytes": (Path(directory) / name).stat().st_size, "sha256": sha256_path(Path(directory) / name)}
        for name in names
    }
    (Path(directory) / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n")
    write_stamp(directory)


def check_files(cache: Path, rehash: bool) -> None:
    """Compare the files' sizes with checksums.json (absent in caches rewritten by other tools:
    skipped) and, if `rehash`, their SHA-256, stamping the files as verified when all agree."""
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
    if not rehash:
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


def as_verified(cache: Path) -> bool:
    """Whether every file has the size and modification time it had when its SHA-256 was last
    checked (stat calls only: what lets train start in O(1) of the data)."""
    try:
        return _stamp(cache) == _read_stamp(cache)
    except (OSError, UsageError):  # no checksums.json, or a listed file is gone: check_files says which
        return False


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
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
