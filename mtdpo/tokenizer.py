"""Load the tokenizer for stage one; fingerprint saved tokenizers for the manifest.

Stage two never loads a tokenizer: it only compares fingerprints and copies the files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mtdpo.errors import UsageError

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_TOKENIZER = ASSETS / "tokenizer"
SAMPLE_DATA = ASSETS / "sample.jsonl"
# Real chat templates shipped for checkpoints that often come without one (a GGUF file has
# none): `--chat-template gemma3` picks assets/templates/gemma3.jinja.
TEMPLATES = ASSETS / "templates"


def load_tokenizer(name_or_path: str | None = None, chat_template: Path | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = str(name_or_path or EMBEDDED_TOKENIZER)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise UsageError(
            f"tokenizer not found or not loadable: {source} ({type(err).__name__}: {err})".splitlines()[0]
        ) from None
    if not tokenizer.is_fast:
        raise UsageError(f"{source} has no fast tokenizer; mtdpo needs character offsets to find assistant spans")
    if chat_template is not None:
        tokenizer.chat_template = chat_template_file(chat_template).read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise UsageError(
            f"{source} has no chat template; pass one with --chat-template FILE or NAME ({', '.join(packaged_templates())})"
        )
    check_template_compiles(tokenizer, chat_template or source)
    return tokenizer


def packaged_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def chat_template_file(value: str | Path) -> Path:
    """A template file, or the packaged template of that name (a file of the name wins)."""
    path = Path(value)
    if path.is_file():
        return path
    if path.name == str(value) and (TEMPLATES / f"{value}.jinja").is_file():
        return TEMPLATES / f"{value}.jinja"
    raise UsageError(
        f"chat template not found: {value} is neither a file nor a packaged template ({', '.join(packaged_templates())})"
    )


def check_template_compiles(tokenizer, where) -> None:
    """A template with a syntax error would reject every row one by one: say it once, up front."""
    from jinja2 import TemplateSyntaxError

    from mtdpo.preprocess.mask import compile_template  # compiled once: the masking code reuses it

    try:
        compile_template(tokenizer.chat_template)
    except TemplateSyntaxError as err:
        raise UsageError(f"the chat template of {where} does not compile: {err.message} (line {err.lineno})") from None


def fingerprint_dir(path: Path) -> str | None:
    """SHA-256 of a saved tokenizer.json's bytes: what preprocess records and train compares first.

    Hashing the bytes takes 0.03 s for Gemma 3's 33 MB file, where the vocabulary hash below
    (a JSON round trip) takes 3.5 s; save_pretrained writes the same bytes for the same tokenizer.
    """
    file = Path(path) / "tokenizer.json"
    return sha256_path(file) if file.is_file() else None


def same_tokenizer(fingerprint: str, cache_tokenizer: Path, other: Path) -> bool:
    """Whether the tokenizer.json in `other` is the one a manifest's `fingerprint` names.

    Equal bytes decide at once. Otherwise (a file written by another tool or version) the
    vocabulary hashes decide: `other`'s against the cache's own copy, when that copy is the
    file the fingerprint was taken from, or against the fingerprint itself (caches written
    before fingerprints were byte hashes held the vocabulary hash).
    """
    if fingerprint_dir(other) == fingerprint:
        return True
    vocabulary = vocabulary_hash_dir(other)
    if vocabulary == fingerprint:
        return True
    return fingerprint_dir(cache_tokenizer) == fingerprint and vocabulary_hash_dir(cache_tokenizer) == vocabulary


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


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_path(path: Path) -> str:
    """Content hash of a file, or of every file under a directory (sorted, names included)."""
    path, digest = Path(path), hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()
