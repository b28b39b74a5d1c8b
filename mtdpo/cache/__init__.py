"""The cache contract, in one package: what a cache holds, how it is written, how it is opened.

A cache is a directory that `datasets.load_from_disk` opens: Arrow shards of `PairRecord`s, or
of `KtoRecord`s for a KTO cache (schema.py; the manifest's `kind` says which), manifest.json
(manifest.py: what made it), checksums.json (each file's size and SHA-256), stats.json, rejects.jsonl, a copy of the tokenizer and, after precompute-ref, a
`reference/` dataset of log-probs beside the shards (docs/DESIGN.md, "The cache contract").
`CacheWriter` writes one (writer.py); `open_cache` / `open_caches` give the `OpenCache` handle
every reader receives (reader.py). Nothing outside this package spells a column name.
"""

from mtdpo.cache.manifest import Manifest, ReferenceInfo, TokenizerInfo
from mtdpo.cache.reader import (
    OpenCache,
    check_model_matches,
    expand_cache_paths,
    kto_lengths,
    open_cache,
    open_caches,
    pair_lengths,
    read_manifest,
)
from mtdpo.cache.schema import (
    IGNORE_INDEX,
    KTO,
    PAIR,
    SIDES,
    KtoRecord,
    PairRecord,
    Sequence,
    kto_table,
    pair_table,
    trained_tokens,
)
from mtdpo.cache.writer import CacheWriter, write_reference, write_reference_columns

__all__ = [
    "IGNORE_INDEX",
    "KTO",
    "PAIR",
    "SIDES",
    "CacheWriter",
    "KtoRecord",
    "Manifest",
    "OpenCache",
    "PairRecord",
    "ReferenceInfo",
    "Sequence",
    "TokenizerInfo",
    "check_model_matches",
    "expand_cache_paths",
    "kto_lengths",
    "kto_table",
    "open_cache",
    "open_caches",
    "pair_lengths",
    "pair_table",
    "read_manifest",
    "trained_tokens",
    "write_reference",
    "write_reference_columns",
]
