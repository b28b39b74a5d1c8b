"""Opening caches: `open_cache` gives an `OpenCache` handle, the one thing train, show-sample,
stats and precompute-ref receive; `open_caches` joins several caches whose manifests agree.

Opening reads the manifest, the shards' record-batch headers (memory-mapped: no token list is
copied into RAM) and, for files that changed since they were last hashed, their checksums, so
start-up does not grow with the data.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from mtdpo.assets import EMBEDDED_TOKENIZER
from mtdpo.cache.files import TEMPORARY_DIR, as_verified, check_files, check_shard, shard_files
from mtdpo.cache.manifest import Manifest
from mtdpo.cache.schema import (
    DESIRABLE,
    KIND_NAMES,
    KTO,
    KTO_IDS,
    KTO_LABELS,
    LENGTH,
    LENGTH_COLUMNS,
    PAIR_INDEX,
    PROBLEM,
    PROMPT_LEN,
    ROW,
    SIDES,
    KtoRecord,
    PairRecord,
    ids_column,
    labels_column,
    length_column,
    record_type,
    reference_columns,
    required_columns,
    starts_of,
)
from mtdpo.cache.writer import REFERENCE, REJECTS, SEQUENCE_STARTS, STATS, TOKENIZER
from mtdpo.errors import UsageError
from mtdpo.families import Family, detect_family
from mtdpo.fingerprint import same_tokenizer

# What a tokenizer's save_pretrained writes (slow and fast tokenizers, templates): the files of the
# cache's tokenizer copy that train puts next to the model. Anything else stays in the cache.
TOKENIZER_FILES = re.compile(
    r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja"
    r"|chat_template\.json|vocab\.json|vocab\.txt|merges\.txt|tokenizer\.model|spiece\.model|[\w.-]+\.tiktoken"
    r"|sentencepiece\.bpe\.model|additional_chat_templates/[\w.-]+\.jinja"
)


class SequenceStarts:
    """Where the sides of several sequences split, by pair position (sequence_starts.arrow,
    memory-mapped); pairs it does not list are one sequence per side."""

    def __init__(self, tables: list[tuple[int, object]]):
        self.tables = tables  # (position of the cache's first pair, its table) per cache
        self.pairs = [t[PAIR_INDEX].to_numpy() + offset for offset, t in tables]

    @classmethod
    def read(cls, cache: Path, offset: int = 0) -> SequenceStarts:
        import pyarrow as pa

        file = cache / SEQUENCE_STARTS
        return cls([(offset, pa.ipc.open_file(pa.memory_map(str(file))).read_all())] if file.is_file() else [])

    def __add__(self, other: SequenceStarts) -> SequenceStarts:
        return SequenceStarts(self.tables + other.tables)

    def of(self, index: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        for (_, table), pairs in zip(self.tables, self.pairs):
            at = int(np.searchsorted(pairs, index))
            if at < len(pairs) and pairs[at] == index:
                return starts_of(table, at)
        return None

    def __len__(self) -> int:
        return sum(len(pairs) for pairs in self.pairs)

    def indices(self) -> list[int]:
        """Positions of the pairs with a side of several sequences, in order."""
        return [int(i) for pairs in self.pairs for i in pairs]


@dataclass
class OpenCache:
    """One cache, or several that agree, opened: the memory-mapped records (pairs, or KTO rows:
    `kind`) and what made them."""

    paths: list[Path]
    manifests: list[Manifest]
    dataset: object  # datasets.Dataset, memory-mapped
    starts: SequenceStarts

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def manifest(self) -> Manifest:
        return self.manifests[0]

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def is_kto(self) -> bool:
        return self.kind == KTO

    def record(self, index: int) -> PairRecord | KtoRecord:
        return record_type(self.kind).from_row(self.dataset[index], self.starts.of(index))

    @property
    def pairs(self) -> PairDataset:
        """The pairs as records, for a DataLoader (what training iterates; KTO rows: kto_data.KtoRows)."""
        return PairDataset(self)

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER

    def tokenizer_copy(self) -> list[Path]:
        """The files of the tokenizer copy that go next to a trained model: the known tokenizer
        files, regular ones only (a symlink is refused, never followed). Code (an `auto_map`, a
        .py file) is refused unless preprocess ran with --trust-remote-code, so a model folder never
        carries code nobody chose to trust."""
        folder, files = self.tokenizer_dir, []
        for file in sorted(folder.rglob("*")) if folder.is_dir() else []:
            name = file.relative_to(folder).as_posix()
            if file.is_symlink():
                raise UsageError(f"{file} in the cache's tokenizer copy is a symlink: refused (not followed)")
            is_code = file.suffix == ".py"
            if file.is_dir() or not (is_code or TOKENIZER_FILES.fullmatch(name)):
                continue  # left out: not a tokenizer file
            if is_code and not self.manifest.trust_remote_code:
                raise UsageError(
                    f"the cache's tokenizer copy holds code ({file}) but was not preprocessed with --trust-remote-code: "
                    "not copied next to the model; preprocess again with --trust-remote-code if you trust it"
                )
            files.append(file)
        config = folder / "tokenizer_config.json"
        if not self.manifest.trust_remote_code and config.is_file() and "auto_map" in _json_object(config):
            raise UsageError(
                f"{config} names tokenizer code (auto_map) but the cache was not preprocessed with --trust-remote-code: "
                "not copied next to the model; preprocess again with --trust-remote-code if you trust it"
            )
        return files

    def copy_tokenizer(self, destination: Path) -> None:
        """Put the tokenizer copy (`tokenizer_copy`) next to a model, so it loads with AutoTokenizer."""
        for file in self.tokenizer_copy():
            target = Path(destination) / file.relative_to(self.tokenizer_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink():  # written through, it would land wherever it points
                target.unlink()
            shutil.copyfile(file, target, follow_symlinks=False)

    @property
    def rejects_file(self) -> Path:
        return self.path / REJECTS

    @property
    def stats_file(self) -> Path:
        return self.path / STATS

    def chat_template(self) -> str | None:
        """The template the cache was rendered with, from its tokenizer copy (without loading it)."""
        folder = self.tokenizer_dir
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        config = folder / "tokenizer_config.json"
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
        return template if isinstance(template, str) else None

    def family(self) -> Family | None:
        """The template family (turn markers, tool-call syntax) of the cache's chat template."""
        return detect_family(self.chat_template())

    def token_ids(self, tokens: tuple[str, ...]) -> list[int] | None:
        """The ids of `tokens` in the cache's vocabulary, or None if one is not a single token
        (read from tokenizer.json with `tokenizers`: no transformers tokenizer is built)."""
        from tokenizers import Tokenizer

        file = self.tokenizer_dir / "tokenizer.json"
        if not tokens or not file.is_file():
            return None
        vocabulary = Tokenizer.from_file(str(file))
        ids = [vocabulary.token_to_id(token) for token in tokens]
        return None if None in ids else ids

    def load_tokenizer(self):
        """The tokenizer copy, for commands that decode (show-sample): never needed to train.

        Read with `tokenizers` alone (a PlainTokenizer): transformers' AutoTokenizer imports torch, and
        showing one pair of a Gemma 3 cache took 8 s and 0.9 GB. A copy that has no tokenizer.json,
        or asks decode to clean up spaces, loads with AutoTokenizer."""
        plain = PlainTokenizer.read(self.tokenizer_dir, self.chat_template())
        if plain is not None:
            return plain
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    @cached_property
    def has_reference(self) -> bool:
        """Whether every record carries precomputed reference log-probs."""
        return set(reference_columns(self.kind)) <= set(self.dataset.column_names)

    # Whole columns, for numpy work over every record (stats, length grouping).
    def lengths(self, side: str | None = None) -> np.ndarray:
        """A side's lengths (pairs), or the rows' (KTO: no side)."""
        return _column(self.dataset, LENGTH if self.is_kto else length_column(side))

    def desirable(self) -> np.ndarray:
        """KTO rows: each row's label, True where desirable."""
        return _column(self.dataset, DESIRABLE)

    def prompt_lengths(self) -> np.ndarray:
        return _column(self.dataset, PROMPT_LEN)

    def source_rows(self) -> np.ndarray:
        return _column(self.dataset, ROW)

    def prompts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(problem key, tokens past the problem's prefix, the problem's prefix) per pair or KTO row:
        what `--group-by-prompt` groups by and a forest's token budget counts (a group costs its
        prefix once and each member its own tokens past it), the same on every rank.

        Records answering one problem share a key: the cache's PROBLEM column (the messages before
        the first assistant turn), or in a cache written before it, their first `prompt_len` tokens.
        A problem's prefix is the tokens all its records' first sequences share (a pair's own prompt
        may reach further: into a first turn both its trajectories share)."""
        data = self.dataset.data
        prompt = data.column(PROMPT_LEN).to_numpy().astype(np.int64)
        if self.is_kto:
            ids, total, sides = KTO_IDS, data.column(LENGTH).to_numpy().astype(np.int64), 1
        else:
            ids = ids_column(SIDES[0])
            total, sides = sum(data.column(length_column(s)).to_numpy().astype(np.int64) for s in SIDES), len(SIDES)
        heads = []  # each record's first prompt_len tokens (views of the mapped shards)
        for chunk in data.column(ids).chunks:
            offsets, values = chunk.offsets.to_numpy(), chunk.values.to_numpy()
            heads += [values[offsets[k] : offsets[k] + prompt[len(heads) + k]] for k in range(len(chunk))]
        if PROBLEM in data.column_names and data.column(PROBLEM).null_count == 0:
            keys = data.column(PROBLEM).to_numpy().astype(np.int64)
        else:
            keys = np.array([_token_key(head) for head in heads], dtype=np.int64)
        # The tokens a problem's records share: the least of each one's common prefix with the first.
        first: dict[int, int] = {}
        shared = np.array(
            [_common_prefix(heads[first.setdefault(k, i)], heads[i]) for i, k in enumerate(keys.tolist())]
        )
        _, problem = np.unique(keys, return_inverse=True)
        least = np.full(problem.max(initial=-1) + 1, np.iinfo(np.int64).max)
        np.minimum.at(least, problem, shared)
        shared = least[problem]
        # past the problem's prefix: a pair's prompt beyond it once, then each side's own tokens
        suffix = total - prompt * (sides - 1) - shared
        return keys, suffix, shared

    def token_columns(self, side: str | None = None):
        """(ids, labels) of one side (pairs; KTO rows: no side) as Arrow list columns (zero-copy
        views of the mapped shards)."""
        ids, labels = (KTO_IDS, KTO_LABELS) if self.is_kto else (ids_column(side), labels_column(side))
        return self.dataset.data.column(ids), self.dataset.data.column(labels)

    def token_ids_of(self, start: int, stop: int) -> dict[str, list]:
        """The token ids of records [start, stop), by side ("sequence" for KTO rows; for text search)."""
        if self.is_kto:
            return {"sequence": self.dataset.select_columns([KTO_IDS])[start:stop][KTO_IDS]}
        batch = self.dataset.select_columns([ids_column(side) for side in SIDES])[start:stop]
        return {side: batch[ids_column(side)] for side in SIDES}


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is corrupt: {err}") from None
    return data if isinstance(data, dict) else {}


def _token_key(tokens: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(tokens.tobytes(), digest_size=8).digest(), "little", signed=True)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _column(dataset, name: str) -> np.ndarray:
    return dataset.data.column(name).to_numpy()


class PairDataset:
    """A cache's pairs as `PairRecord`s by position: a map-style dataset for torch's DataLoader,
    reading a batch of rows in one Arrow call (`__getitems__`)."""

    def __init__(self, cache: OpenCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> PairRecord:
        return self.cache.record(index)

    def __getitems__(self, indices: list[int]) -> list[PairRecord]:
        rows = self.cache.dataset[indices]  # one dict of columns
        return [
            PairRecord.from_row({name: values[k] for name, values in rows.items()}, self.cache.starts.of(index))
            for k, index in enumerate(indices)
        ]

    def lengths(self) -> np.ndarray:
        """max(chosen, rejected) tokens per pair: what length grouping sorts by."""
        return pair_lengths(self.cache.dataset)

    def prompts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.cache.prompts()


def pair_lengths(dataset) -> np.ndarray:
    """max(chosen, rejected) length per pair of a cache dataset (or a selection of one). The cache's
    own memory-mapped table is read as two Arrow columns; a dataset with an index mapping (select,
    shuffle) goes through datasets' numpy formatter."""
    if getattr(dataset, "_indices", None) is None:
        table = dataset.with_format("arrow", columns=list(LENGTH_COLUMNS))[:]
        return np.maximum(*(table[c].to_numpy() for c in LENGTH_COLUMNS))
    columns = dataset.with_format("numpy", columns=list(LENGTH_COLUMNS))[:]
    return np.maximum(*(columns[c] for c in LENGTH_COLUMNS))


def kto_lengths(dataset) -> np.ndarray:
    """The length of each row of a KTO cache dataset, read as one Arrow column."""
    if getattr(dataset, "_indices", None) is None:
        return dataset.with_format("arrow", columns=[LENGTH])[:][LENGTH].to_numpy()
    return dataset.with_format("numpy", columns=[LENGTH])[:][LENGTH]


# ── opening ───────────────────────────────────────────────────────────────────


def read_manifest(cache: Path) -> Manifest:
    cache = Path(cache)
    if TEMPORARY_DIR.match(cache.name):
        raise UsageError(
            f"{cache} is the temporary directory of an unfinished or interrupted run, not a cache; "
            "run `mtdpo preprocess` again"
        )
    return Manifest.read(cache)


@dataclass(frozen=True)
class PlainTokenizer:
    """What show-sample asks of a transformers tokenizer, with the same results from the same
    tokenizer.json: decode and batch_decode (special tokens kept), a call that returns ids and
    character offsets, and the chat template."""

    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str | None

    @classmethod
    def read(cls, folder: Path, chat_template: str | None) -> PlainTokenizer | None:
        """From a saved tokenizer's folder; None where only transformers gives the same text: no
        tokenizer.json (a slow-only tokenizer), or decode set to clean up spaces."""
        file, config = folder / "tokenizer.json", folder / "tokenizer_config.json"
        options = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        if not file.is_file() or options.get("clean_up_tokenization_spaces"):
            return None
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(file)), chat_template)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def batch_decode(self, sequences) -> list[str]:
        return self.tokenizer.decode_batch([list(ids) for ids in sequences], skip_special_tokens=False)

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> dict:
        encoding = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": encoding.ids, "offset_mapping": encoding.offsets}


def open_cache(cache: Path, verify: bool = False, full: bool = False) -> OpenCache:
    """One cache, memory-mapped.

    Sizes are always checked against checksums.json. `verify` also compares SHA-256 for the files
    whose size or modification time changed since their last verification (none, for a cache as
    preprocess left it); `full` re-hashes every file.
    """
    cache = Path(cache)
    manifest = read_manifest(cache)
    return OpenCache([cache], [manifest], _load(cache, manifest, verify, full), SequenceStarts.read(cache))


def _load(cache: Path, manifest: Manifest, verify: bool, full: bool):
    import datasets

    shards = shard_files(cache)
    verified = as_verified(cache)
    if not verified:  # a file changed since it was hashed: see that every shard reads to its end
        for shard in shards:
            check_shard(shard)
    check_files(cache, rehash=full or (verify and not verified))
    dataset = _load_from_disk(cache)
    missing = [c for c in required_columns(manifest.kind) if c not in dataset.column_names]
    if missing:
        raise UsageError(f"the shards in {cache} lack the column(s) {', '.join(missing)}; preprocess again")
    if len(dataset) != manifest.pairs:
        unit = f"{manifest.unit}s"
        raise UsageError(
            f"the shards in {cache} hold {len(dataset):,} {unit} but manifest.json says {manifest.pairs:,}"
        )
    columns = reference_columns(manifest.kind)
    if manifest.reference is not None and (cache / REFERENCE).is_dir():
        reference = _load_from_disk(cache / REFERENCE)
        if len(reference) != len(dataset):
            raise UsageError(
                f"{cache / REFERENCE} holds {len(reference):,} rows for {len(dataset):,} {manifest.unit}s; run precompute-ref again"
            )
        dataset = dataset.remove_columns([c for c in columns if c in dataset.column_names])
        dataset = datasets.concatenate_datasets([dataset, reference], axis=1)
    elif manifest.reference is None:  # columns no manifest vouches for are not used
        dataset = dataset.remove_columns([c for c in columns if c in dataset.column_names])
    return dataset


def _load_from_disk(directory: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(directory))
    except Exception as err:  # datasets raises many kinds for a damaged directory
        raise UsageError(
            f"cannot open the shards in {directory}: {type(err).__name__}: {err}".splitlines()[0]
        ) from None


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


def open_caches(paths: list[str], verify_all: bool = False) -> OpenCache:
    """One memory-mapped dataset from one or more caches whose manifests agree, in order.

    Shards are re-hashed only if they changed since their last verification, or all of them with
    `verify_all` (`--verify-cache`)."""
    from datasets import concatenate_datasets

    paths = [Path(p) for p in paths]
    manifests = [read_manifest(p) for p in paths]
    _check_agree(paths, manifests)
    datasets = [_load(p, m, verify=True, full=verify_all) for p, m in zip(paths, manifests)]
    for path, manifest, dataset in zip(paths, manifests, datasets):
        if len(dataset) == 0:
            raise UsageError(
                f"cache {path} holds no {manifest.unit}s (kept {manifest.pairs} of {manifest.counts.get('rows', '?')} rows; "
                f"see {path / REJECTS})"
            )
    columns = set(reference_columns(manifests[0].kind))
    with_reference = [p for p, d in zip(paths, datasets) if columns <= set(d.column_names)]
    without = [p for p, d in zip(paths, datasets) if not columns <= set(d.column_names)]
    if with_reference and without:  # the collator cannot mix batches with and without them
        raise UsageError(
            f"caches {with_reference[0]} and {without[0]}: the first holds precomputed reference log-probs, the second none; "
            f"run `mtdpo precompute-ref {without[0]}` with the same reference, or pass caches of one kind"
        )
    if not all(PROBLEM in d.column_names for d in datasets):  # one written before it: keys from prompt tokens
        datasets = [d.remove_columns([PROBLEM]) if PROBLEM in d.column_names else d for d in datasets]
    dataset = datasets[0] if len(datasets) == 1 else concatenate_datasets(datasets)
    offsets = np.cumsum([0, *(len(d) for d in datasets)])
    starts = sum((SequenceStarts.read(p, int(o)) for p, o in zip(paths, offsets)), SequenceStarts([]))
    return OpenCache(paths, manifests, dataset, starts)


def _check_agree(paths: list[Path], manifests: list[Manifest]) -> None:
    first, fingerprint = manifests[0], manifests[0].tokenizer.fingerprint
    for path, manifest in zip(paths[1:], manifests[1:]):
        if manifest.kind != first.kind:  # DPO on pairs and KTO on labelled rows are two objectives
            raise UsageError(
                f"{paths[0]} is {KIND_NAMES[first.kind]} and {path} {KIND_NAMES[manifest.kind]}: train them in separate runs"
            )
        if manifest.tokenizer.fingerprint != fingerprint and not same_tokenizer(
            fingerprint, paths[0] / TOKENIZER, path / TOKENIZER
        ):
            raise UsageError(f"caches {paths[0]} and {path} disagree on tokenizer.fingerprint; preprocess them alike")
        if field_name := first.disagreement(manifest):
            raise UsageError(f"caches {paths[0]} and {path} disagree on {field_name}; preprocess them alike")
    slices = {}  # (input hash, shard) -> the first cache holding that slice of that input
    for path, manifest in zip(paths, manifests):
        if shard := manifest.shard:
            source = manifest.input.get("sha256") or manifest.input.get("path")  # a hub dataset has no hash
            key = (source, shard["index"], shard["count"])
            if key in slices:
                raise UsageError(
                    f"caches {slices[key]} and {path} are the same slice ({shard['index']}/{shard['count']}) "
                    "of one input; pass each once"
                )
            slices[key] = path


def check_model_matches(cache: OpenCache, model_path: str | None, vocab_size: int, allow_mismatch: bool) -> None:
    """Refuse a model whose tokenizer is not the one the cache was tokenized with."""
    info = cache.manifest.tokenizer
    if info.vocab_size > vocab_size:
        hint = " (the tiny default model fits only the embedded tokenizer; pass --model)" if model_path is None else ""
        raise UsageError(
            f"the cache uses token ids up to {info.vocab_size - 1} but the model's vocabulary has {vocab_size}{hint}"
        )
    tokenizer_dir = EMBEDDED_TOKENIZER if model_path is None else Path(model_path)
    if (
        (tokenizer_dir / "tokenizer.json").is_file()
        and not allow_mismatch
        and not same_tokenizer(info.fingerprint, cache.tokenizer_dir, tokenizer_dir)
    ):
        raise UsageError(
            f"the model's tokenizer ({tokenizer_dir}) differs from the cache's ({info.name_or_path}): "
            "re-run `mtdpo preprocess --tokenizer` with the model's tokenizer, or pass --allow-mismatch"
        )
