"""manifest.json: what made a cache, typed.

Written once by preprocess (and extended by precompute-ref with the reference that made the
log-prob columns); read by every command that opens a cache, which refuses a missing or damaged
field in one line. The JSON keeps the order of the fields below.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from mtdpo import __version__
from mtdpo.cache.schema import KINDS, KTO, PAIR, SCHEMA_VERSION
from mtdpo.errors import UsageError

MANIFEST = "manifest.json"
COUNTS = ("rows", "kept", "rejected", "dropped", "truncated")
TOKEN_TOTALS = ("chosen_tokens", "rejected_tokens", "chosen_trained_tokens", "rejected_trained_tokens")
# A KTO cache also counts its labels (train weighs them: kto_loss.weight_advice), and its totals by label.
KTO_COUNTS = (*COUNTS, "desirable", "undesirable")
KTO_TOKEN_TOTALS = ("desirable_tokens", "undesirable_tokens", "desirable_trained_tokens", "undesirable_trained_tokens")


def counts_of(kind: str) -> tuple[str, ...]:
    return KTO_COUNTS if kind == KTO else COUNTS


def token_totals_of(kind: str) -> tuple[str, ...]:
    return KTO_TOKEN_TOTALS if kind == KTO else TOKEN_TOTALS


# What every reader needs, each refused by name when missing.
REQUIRED = (
    ("tokenizer", "fingerprint"),
    ("tokenizer", "vocab_size"),
    ("chat_template_sha256",),
    ("mask_mode",),
    ("max_length",),
    ("counts", "kept"),
)


@dataclass(frozen=True)
class TokenizerInfo:
    name_or_path: str
    fingerprint: str  # SHA-256 of the saved tokenizer.json (mtdpo/fingerprint.py)
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None  # a tokenizer may have none: batches then pad with 0


@dataclass(frozen=True)
class ReferenceInfo:
    """The model whose log-probs precompute-ref stored: train uses them only with the same one."""

    model: str = ""  # as the user named it
    path: str | None = None  # resolved directory, or None for the tiny random model
    seed: int | None = None  # the tiny random model's seed
    weights_sha256: str | None = None  # None: written by an mtdpo that did not record it
    columns: list[str] = field(default_factory=list)
    precision: str = "fp32"  # bf16 or fp32: the log-probs are computed at the training precision
    # kto caches: the per-device train batch size whose chunks paired each row with its KL partner
    # (kto_loss.kl_partners); a run with another batch size pairs differently and cannot use them.
    kl_batch_size: int | None = None


# Options written to the manifest only when on.
OPT_IN = ("tools_as_text", "control_as_text")


@dataclass(frozen=True)
class Manifest:
    tokenizer: TokenizerInfo
    chat_template_sha256: str
    mask_mode: str
    max_length: int
    counts: dict  # COUNTS
    tokens: dict = field(default_factory=dict)  # TOKEN_TOTALS
    chat_template_file: str | None = None
    seed_markers: list[str] | None = None  # seed mode: [user-turn start, end of turn]
    tools_as_text: bool = False  # tool calls, results and schemas were written as text (--tools-as-text)
    control_as_text: bool = False  # control-token text in messages encoded as text (--control-as-text)
    truncation: str = "keep_start"
    input: dict = field(default_factory=dict)  # path, format, sha256 (, split, files)
    shard: dict | None = None  # the --shard slice of the input, or None for all of it
    reference: ReferenceInfo | None = None
    kind: str = PAIR
    # preprocess --trust-remote-code: the tokenizer copy may hold code (auto_map, *.py), which train
    # then copies into the model folder; without it such a copy is refused (reader.tokenizer_copy).
    trust_remote_code: bool = False
    schema_version: int = SCHEMA_VERSION
    mtdpo_version: str = __version__

    # Fields that must agree for several caches to be one dataset (the tokenizer is compared on
    # its own: two fingerprints may name one tokenizer).
    COMPATIBLE = ("kind", "chat_template_sha256", "mask_mode", "seed_markers", "max_length")

    @property
    def pairs(self) -> int:
        """Records kept: pairs, or KTO rows."""
        return self.counts["kept"]

    @property
    def unit(self) -> str:
        """What one record is called in messages: "pair" or "row"."""
        return "row" if self.kind == KTO else "pair"

    def with_reference(self, reference: ReferenceInfo) -> Manifest:
        return dataclasses.replace(self, reference=reference)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        order = ("schema_version", "mtdpo_version", "kind", "tokenizer", "chat_template_sha256", "chat_template_file")
        order += (
            "trust_remote_code",
            "mask_mode",
            "seed_markers",
            "tools_as_text",
            "control_as_text",
            "max_length",
            "truncation",
            "input",
        )
        order += ("shard", "counts", "tokens")
        # the options of rare use only when on: the manifests of other caches stay as they were
        out = {key: data[key] for key in order if key not in OPT_IN or data[key]}
        if self.reference is not None:
            out["reference"] = data["reference"]
            if self.reference.kl_batch_size is None:  # a pair cache's: no KL partners
                del out["reference"]["kl_batch_size"]
        return json.dumps(out, indent=2, ensure_ascii=False) + "\n"

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def read(cls, cache: Path) -> Manifest:
        """The manifest of `cache`, or a UsageError naming what is missing or damaged."""
        path = Path(cache) / MANIFEST
        if not path.is_file():
            raise UsageError(f"{cache} is not an mtdpo cache (no {MANIFEST}); run `mtdpo preprocess` first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"{path} is corrupt: {err}") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise UsageError(f"{path}: schema version {version}, this mtdpo reads {SCHEMA_VERSION}")
        for keys in REQUIRED:
            value = data
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if value is None:
                raise UsageError(f"{path} is corrupt: it lacks {'.'.join(keys)}")
        if data.get("kind", PAIR) not in KINDS:
            raise UsageError(f"{path}: record kind {data.get('kind')!r}, this mtdpo reads {' and '.join(KINDS)}")
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"{path} is corrupt: {type(err).__name__}: {err}") from None

    @classmethod
    def _from_dict(cls, data: dict) -> Manifest:
        tokenizer = data["tokenizer"]
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        values["tokenizer"] = TokenizerInfo(
            **{f.name: tokenizer.get(f.name) for f in dataclasses.fields(TokenizerInfo)}
        )
        if data.get("reference") is not None:
            known = {f.name for f in dataclasses.fields(ReferenceInfo)}
            values["reference"] = ReferenceInfo(**{k: v for k, v in data["reference"].items() if k in known})
        return cls(**values)

    def disagreement(self, other: Manifest) -> str | None:
        """The first field on which two caches may not be trained together, or None."""
        return next((name for name in self.COMPATIBLE if getattr(self, name) != getattr(other, name)), None)
