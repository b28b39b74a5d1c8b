"""What one cached record holds: the record types, their column names and their Arrow types.

Two record kinds (the manifest's `kind`): a **pair** (`PairRecord`: chosen and rejected, for DPO)
and a **kto** row (`KtoRecord`: one trajectory with its desirable / undesirable label, for KTO).
The only place that spells a column name. Stage one builds records and hands them to the
writer; stage two and the inspection commands get them back with `from_row` (`record_type`), or
read whole columns through `OpenCache` (mtdpo/cache/reader.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import accumulate

import pyarrow as pa

SCHEMA_VERSION = 1
IGNORE_INDEX = -100  # the label of every token that is not trained
SIDES = ("chosen", "rejected")
PAIR = "pair"  # the manifest's record kinds
KTO = "kto"
KINDS = (PAIR, KTO)
KIND_NAMES = {PAIR: "a pair cache", KTO: "a KTO cache"}  # what messages call a cache of each kind

ROW = "row"  # the source row, so every pair can be traced back to its input
PROMPT_LEN = "prompt_len"  # tokens both sequences share before they diverge
# A key of the problem a record answers (its messages before the first assistant turn, hashed):
# what --group-by-prompt groups by. Caches written before it lack it (keys from prompt tokens).
PROBLEM = "problem"


def ids_column(side: str) -> str:
    return f"{side}_input_ids"


def labels_column(side: str) -> str:
    return f"{side}_labels"


def length_column(side: str) -> str:
    """Sequence lengths, for length grouping without reading the token lists."""
    return f"{side}_len"


def reference_column(side: str) -> str:
    """The reference model's summed log-prob of a side's trained tokens (precompute-ref)."""
    return f"ref_{side}_logp"


REFERENCE_COLUMNS = tuple(reference_column(side) for side in SIDES)
LENGTH_COLUMNS = tuple(length_column(side) for side in SIDES)

# Column -> Arrow type, in the order of the shards. Token lists are int32, lengths int32, the row int64.
PAIR_COLUMNS = {
    ids_column("chosen"): pa.list_(pa.int32()),
    labels_column("chosen"): pa.list_(pa.int32()),
    ids_column("rejected"): pa.list_(pa.int32()),
    labels_column("rejected"): pa.list_(pa.int32()),
    PROMPT_LEN: pa.int32(),
    length_column("chosen"): pa.int32(),
    length_column("rejected"): pa.int32(),
    ROW: pa.int64(),
    PROBLEM: pa.int64(),
}
REQUIRED_COLUMNS = (*PAIR_COLUMNS.keys() - {*LENGTH_COLUMNS, PROBLEM},)
REFERENCE_TYPE = pa.float32()


@cache
def pair_features():
    """The schema as `datasets.Features`, which datasets' writer and `load_from_disk` expect."""
    from datasets import Features

    return Features.from_arrow_schema(pa.schema(PAIR_COLUMNS))


@dataclass(frozen=True)
class Sequence:
    """A side's tokens: its ids, and the id where trained, IGNORE_INDEX elsewhere.

    A side scored in several generation contexts (a template that is not prefix-stable) is
    several sequences laid end to end: `starts` says where each begins (one sequence: (0,)).
    Its log-prob is the sum over its sequences."""

    input_ids: list[int]
    labels: list[int]
    starts: tuple[int, ...] = (0,)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        """Tokens whose log-prob is trained: a label is predicted from the token before it, so
        a sequence's first position never counts (the collator and the tallies use this count)."""
        return sum(trained_tokens(piece.labels) for piece in self.pieces())

    @property
    def is_one_sequence(self) -> bool:
        return len(self.starts) == 1

    def pieces(self) -> list[Sequence]:
        """The sequences one by one."""
        if self.is_one_sequence:
            return [self]
        bounds = [*self.starts, len(self.input_ids)]
        return [Sequence(self.input_ids[a:b], self.labels[a:b]) for a, b in zip(bounds, bounds[1:])]

    @classmethod
    def join(cls, pieces: list[Sequence]) -> Sequence:
        if len(pieces) == 1:
            return pieces[0]
        starts = tuple(accumulate((len(p) for p in pieces[:-1]), initial=0))
        return cls([i for p in pieces for i in p.input_ids], [t for p in pieces for t in p.labels], starts)


def trained_tokens(labels) -> int:
    return len(labels) - 1 - list(labels[1:]).count(IGNORE_INDEX) if len(labels) else 0


@dataclass(frozen=True)
class PairRecord:
    """One preference pair as cached: both sides' whole conversations and where they part."""

    chosen: Sequence
    rejected: Sequence
    prompt_len: int
    row: int
    reference: tuple[float, float] | None = None  # (chosen, rejected) log-probs, when precomputed
    problem: int | None = None  # the PROBLEM key (None: a cache written before it)

    def side(self, name: str) -> Sequence:
        return self.chosen if name == "chosen" else self.rejected

    def to_row(self) -> dict:
        """The record as a row of the shards (reference columns are written apart)."""
        row = {}
        for side in SIDES:
            sequence = self.side(side)
            row[ids_column(side)], row[labels_column(side)] = sequence.input_ids, sequence.labels
        row.update({PROMPT_LEN: self.prompt_len, length_column("chosen"): len(self.chosen)})
        row.update({length_column("rejected"): len(self.rejected), ROW: self.row, PROBLEM: self.problem})
        return row

    @property
    def starts(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Where each side's sequences begin, for the sequence-starts table; None for a pair of
        one sequence per side (what the shards alone describe)."""
        if self.chosen.is_one_sequence and self.rejected.is_one_sequence:
            return None
        return self.chosen.starts, self.rejected.starts

    @classmethod
    def from_row(cls, row: dict, starts: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> PairRecord:
        """A row read from the shards (as datasets gives it) back as a record, with its sides'
        sequence starts where the cache's sequence-starts table has them."""
        starts = starts or ((0,), (0,))
        sides = [Sequence(row[ids_column(side)], row[labels_column(side)], tuple(s)) for side, s in zip(SIDES, starts)]
        reference = tuple(row[c] for c in REFERENCE_COLUMNS) if REFERENCE_COLUMNS[0] in row else None
        return cls(*sides, row[PROMPT_LEN], row[ROW], reference, row.get(PROBLEM))


def pair_table(records: list[PairRecord]) -> pa.Table:
    """Records as an Arrow table of the shards' schema (cheap to send between processes)."""
    return pa.Table.from_pylist([r.to_row() for r in records], schema=pair_features().arrow_schema)


# The sequence-starts table: one row per pair with a side of several sequences (none for a cache
# whose sides are all one sequence, so such caches are what they were before it existed).
PAIR_INDEX = "pair"  # the pair's position in the cache
STARTS_SCHEMA = pa.schema({PAIR_INDEX: pa.int64(), **{f"{side}_starts": pa.list_(pa.int32()) for side in SIDES}})


def starts_table(records: list[PairRecord]) -> pa.Table:
    """The sequence starts of the records with a side of several sequences, each numbered by its
    position among `records` (the writer moves them to their position in the cache)."""
    rows = [
        {PAIR_INDEX: k, **{f"{side}_starts": list(s) for side, s in zip(SIDES, r.starts)}}
        for k, r in enumerate(records)
        if r.starts is not None
    ]
    return pa.Table.from_pylist(rows, schema=STARTS_SCHEMA)


def shift_pairs(table: pa.Table, offset: int) -> pa.Table:
    """A sequence-starts table with its pair positions moved by `offset`."""
    import pyarrow.compute as pc

    return table.set_column(0, PAIR_INDEX, pc.add(table[PAIR_INDEX], offset))


def starts_of(table: pa.Table, row: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(tuple(table[f"{side}_starts"][row].as_py()) for side in SIDES)


# ── the kto kind: one trajectory per row, labelled ───────────────────────────

KTO_IDS, KTO_LABELS = "input_ids", "labels"
DESIRABLE = "label"  # true: desirable, false: undesirable (TRL's unpaired-preference column)
LENGTH = "length"  # the sequence's length, for length grouping without reading the lists
REFERENCE_LOGP = "ref_logp"  # the reference's summed log-prob of the row's trained tokens
REFERENCE_KL_LOGP = "ref_kl_logp"  # ... and of its KL sequence (the row's prompt + its KL partner's completion)
KTO_REFERENCE_COLUMNS = (REFERENCE_LOGP, REFERENCE_KL_LOGP)
KTO_COLUMNS = {
    KTO_IDS: pa.list_(pa.int32()),
    KTO_LABELS: pa.list_(pa.int32()),
    DESIRABLE: pa.bool_(),
    PROMPT_LEN: pa.int32(),
    LENGTH: pa.int32(),
    ROW: pa.int64(),
    PROBLEM: pa.int64(),
}
KTO_REQUIRED_COLUMNS = (*KTO_COLUMNS.keys() - {LENGTH, PROBLEM},)
KTO_GROUPS = ("desirable", "undesirable")  # what stats and show-sample call the two labels


@cache
def kto_features():
    from datasets import Features

    return Features.from_arrow_schema(pa.schema(KTO_COLUMNS))


@dataclass(frozen=True)
class KtoRecord:
    """One unpaired trajectory as cached: its whole conversation, whether it is desirable, and
    `prompt_len`, the tokens before its first trained token (what a KL sequence keeps of it)."""

    sequence: Sequence
    desirable: bool
    prompt_len: int
    row: int
    reference: tuple[float, float] | None = None  # (row, KL sequence) log-probs, when precomputed
    problem: int | None = None  # the PROBLEM key (None: a cache written before it)

    @property
    def group(self) -> str:
        return KTO_GROUPS[0] if self.desirable else KTO_GROUPS[1]

    @property
    def starts(self) -> None:
        """None: a KTO row is one sequence (see `starts_table`; preprocess rejects a trajectory
        scored in several generation contexts, whose KL sequences are not defined yet)."""
        return None

    def side(self, name: str) -> Sequence:
        """The one sequence, under its group's name (the inspection commands' view of a record)."""
        if name != self.group:
            raise KeyError(f"row {self.row} is {self.group}, not {name}")
        return self.sequence

    def to_row(self) -> dict:
        return {
            KTO_IDS: self.sequence.input_ids,
            KTO_LABELS: self.sequence.labels,
            DESIRABLE: self.desirable,
            PROMPT_LEN: self.prompt_len,
            LENGTH: len(self.sequence),
            ROW: self.row,
            PROBLEM: self.problem,
        }

    @classmethod
    def from_row(cls, row: dict, starts=None) -> KtoRecord:
        """A row read from the shards back as a record (`starts`: for the pair kind's signature; a
        KTO row is one sequence, preprocess keeps no other)."""
        reference = tuple(row[c] for c in KTO_REFERENCE_COLUMNS) if REFERENCE_LOGP in row else None
        sequence = Sequence(row[KTO_IDS], row[KTO_LABELS])
        return cls(sequence, bool(row[DESIRABLE]), row[PROMPT_LEN], row[ROW], reference, row.get(PROBLEM))


def first_trained(labels) -> int:
    """The position of the first trained label (after position 0, which nothing predicts), or
    the length when none is: a KtoRecord's prompt_len."""
    return next((t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX), len(labels))


def kto_table(records: list[KtoRecord]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records], schema=kto_features().arrow_schema)


# ── by kind ──────────────────────────────────────────────────────────────────


def features_of(kind: str):
    return kto_features() if kind == KTO else pair_features()


def table_of(kind: str, records: list) -> pa.Table:
    return kto_table(records) if kind == KTO else pair_table(records)


def record_type(kind: str) -> type:
    return KtoRecord if kind == KTO else PairRecord


def required_columns(kind: str) -> tuple[str, ...]:
    return KTO_REQUIRED_COLUMNS if kind == KTO else REQUIRED_COLUMNS


def reference_columns(kind: str) -> tuple[str, ...]:
    """The log-prob columns precompute-ref writes for a cache of this kind."""
    return KTO_REFERENCE_COLUMNS if kind == KTO else REFERENCE_COLUMNS


def length_columns(kind: str) -> tuple[str, ...]:
    return (LENGTH,) if kind == KTO else LENGTH_COLUMNS
