"""Content hashes: of files (one hasher), of a chat template, of a tokenizer's vocabulary.

Stage one records them in the manifest; stage two compares them without loading a tokenizer:
a saved tokenizer.json is identified by its bytes first and, where another tool or version wrote
the same tokenizer with other bytes, by its vocabulary (what decides token ids).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

BLOCK = 1 << 24  # bytes read at a time


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    """The SHA-256 of one file's bytes."""
    digest = hashlib.sha256()
    _update(digest, Path(path))
    return digest.hexdigest()


def sha256_files(files: Iterable[Path], root: Path) -> str:
    """One SHA-256 over several files, each as its name relative to `root`, a NUL, its bytes:
    a renamed or reordered file changes it as a changed byte does."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(Path(file).relative_to(root).as_posix().encode() + b"\0")
        _update(digest, Path(file))
    return digest.hexdigest()


def _update(digest, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)


def weights_sha256(directory: Path) -> str | None:
    """The weight files transformers loads from a model directory (safetensors, else .bin), hashed
    together; None where there are none."""
    files = sorted(Path(directory).glob("*.safetensors")) or sorted(Path(directory).glob("*.bin"))
    return sha256_files(files, Path(directory)) if files else None


# ── tokenizers ────────────────────────────────────────────────────────────────


def tokenizer_fingerprint(directory: Path) -> str | None:
    """SHA-256 of a saved tokenizer.json's bytes: what preprocess records and train compares
    first (save_pretrained writes the same bytes for the same tokenizer)."""
    file = Path(directory) / "tokenizer.json"
    return sha256_file(file) if file.is_file() else None


def same_tokenizer(fingerprint: str, cache_tokenizer: Path, other: Path) -> bool:
    """Whether the tokenizer.json in `other` is the one a manifest's `fingerprint` names.

    Equal bytes decide at once. Otherwise (a file written by another tool or version) the
    vocabulary hashes decide: `other`'s against the cache's own copy, when that copy is the
    file the fingerprint was taken from, or against the fingerprint itself (caches written
    before fingerprints were byte hashes held the vocabulary hash).
    """
    if tokenizer_fingerprint(other) == fingerprint:
        return True
    vocabulary = vocabulary_hash_dir(other)
    if vocabulary == fingerprint:
        return True
    return tokenizer_fingerprint(cache_tokenizer) == fingerprint and vocabulary_hash_dir(cache_tokenizer) == vocabulary


def vocabulary_hash(tokenizer) -> str:
    """Hash of what decides token ids: the vocabulary, merges and added/special tokens."""
    return vocabulary_hash_json(tokenizer.backend_tokenizer.to_str())


def vocabulary_hash_dir(path: Path) -> str | None:
    """The same hash from a saved tokenizer.json, without loading a tokenizer (stage two)."""
    file = Path(path) / "tokenizer.json"
    return vocabulary_hash_json(file.read_text(encoding="utf-8")) if file.is_file() else None


def vocabulary_hash_json(tokenizer_json: str) -> str:
    data = json.loads(tokenizer_json)
    model = data.get("model", {})
    payload = {
        "model": {k: model.get(k) for k in ("type", "vocab", "merges")},
        "added": sorted((t["id"], t["content"], t["special"]) for t in data.get("added_tokens", [])),
    }
    return sha256_text(json.dumps(payload, ensure_ascii=False, sort_keys=True))
