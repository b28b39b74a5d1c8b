"""What one cached pair holds: the record type, its column names and their Arrow types.

The only place that spells a column name. Stage one builds `PairRecord`s and hands them to the
writer; stage two and the inspection commands get them back with `PairRecord.from_row`, or read
whole columns through `OpenCache` (mtdpo/cache/reader.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import pyarrow as pa

SCHEMA_VERSION = 1
IGNORE_INDEX = -100  # the label of every token that is not trained
SIDES = ("chosen", "rejected")
PAIR = "pair"  # the manifest's record kind

ROW = "row"  # the source row, so every pair can be traced back to its input
PROMPT_LEN = "prompt_len"  # tokens both sequences share before they diverge


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
}
REQUIRED_COLUMNS = (*PAIR_COLUMNS.keys() - set(LENGTH_COLUMNS),)
REFERENCE_TYPE = pa.float32()


@cache
def pair_features():
    """The schema as `datasets.Features`, which datasets' writer and `load_from_disk` expect."""
    from datasets import Features

    return Features.from_arrow_schema(pa.schema(PAIR_COLUMNS))


@dataclass(frozen=True)
class Sequence:
    """One tokenized conversation: its ids, and the id where trained, IGNORE_INDEX elsewhere."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        """Tokens whose log-prob is trained: a label is predicted from the token before it, so
        position 0 never counts (the collator and the cache's tallies use this one count)."""
        return trained_tokens(self.labels)


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

    def side(self, name: str) -> Sequence:
        return self.chosen if name == "chosen" else self.rejected

    def to_row(self) -> dict:
        """The record as a row of the shards (reference columns are written apart)."""
        row = {}
        for side in SIDES:
            sequence = self.side(side)
            row[ids_column(side)], row[labels_column(side)] = sequence.input_ids, sequence.labels
        row.update({PROMPT_LEN: self.prompt_len, length_column("chosen"): len(self.chosen)})
        row.update({length_column("rejected"): len(self.rejected), ROW: self.row})
        return row

    @classmethod
    def from_row(cls, row: dict) -> PairRecord:
        """A row read from the shards (as datasets gives it) back as a record."""
        sides = [Sequence(row[ids_column(side)], row[labels_column(side)]) for side in SIDES]
        reference = tuple(row[c] for c in REFERENCE_COLUMNS) if REFERENCE_COLUMNS[0] in row else None
        return cls(*sides, row[PROMPT_LEN], row[ROW], reference)


def pair_table(records: list[PairRecord]) -> pa.Table:
    """Records as an Arrow table of the shards' schema (cheap to send between processes)."""
    return pa.Table.from_pylist([r.to_row() for r in records], schema=pair_features().arrow_schema)
