"""KTO batches: each row of a KTO cache with its KL sequence, in the padded or packed layout.

KTO's reference point z0 is estimated on mismatched sequences: a row's prompt followed by the
completion of its *KL partner*, another row (kto_loss.py). Which row is TRL's rule on the dataset
order: in each chunk of per-device-train-batch-size rows, a row takes the previous row's
completion and the chunk's first row the chunk's last one's. The partner is a pure function of the
row's position and that batch size (`kto_loss.kl_partner`), so `KtoRows` hands each row out with
its partner whatever the sampler's order (sequential, length-grouped, random, resumed), and the
collator builds the KL sequence in token space (`kto_loss.mismatched_sequence`). With TRL's
sequential order on one device the partner is in the same batch, as in TRL.

A batch holds two sub-batches laid out alike: "policy" (the rows, whose log-probs are trained)
and "kl" (their KL sequences, forwarded without gradient); with `--padding-free` each is one
packed row, with `--prefix-forest` one forest row (forest.py: the rows of one problem, grouped
into one micro-batch by `--group-by-prompt`, compute their prompt once, as their KL sequences do). `pair_tokens` counts the rows' tokens, the ones trained (forward and backward): the
tokens/s and MFU of a KTO run count those, as a DPO run's count both sides of its pairs (and, as
there, neither the reference's forwards nor, here, the KL sequences').
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mtdpo.cache import KtoRecord, OpenCache, kto_lengths
from mtdpo.train.data import forest_row, packed, padded
from mtdpo.train.forward import fused_sequence_logps
from mtdpo.train.kto_loss import kl_partner, mismatched_sequence


class KtoRows(Dataset):
    """The rows of an opened KTO cache as (KtoRecord, its KL partner's KtoRecord or None): a
    map-style dataset for torch's DataLoader, as `OpenCache.pairs` is for pairs."""

    def __init__(self, cache: OpenCache, batch_size: int, with_partners: bool = True):
        self.cache, self.batch_size, self.with_partners = cache, batch_size, with_partners

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, position: int) -> tuple[KtoRecord, KtoRecord | None]:
        record = self.cache.record(position)
        if not self.with_partners:
            return record, None
        partner = kl_partner(position, len(self.cache), self.batch_size)
        return record, record if partner == position else self.cache.record(partner)

    def lengths(self) -> np.ndarray:
        """Each row's length: what length grouping sorts by (read as one column)."""
        return kto_lengths(self.cache.dataset)

    def prompts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What `--group-by-prompt` groups by (`OpenCache.prompts`): the rows of one prompt."""
        return self.cache.prompts()


def kl_sequence(record: KtoRecord, partner: KtoRecord, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """The row's prompt + the partner's completion, as (input_ids, labels)."""
    ids, labels, _ = mismatched_sequence(
        (record.sequence.input_ids, record.sequence.labels, record.prompt_len),
        (partner.sequence.input_ids, partner.sequence.labels, partner.prompt_len),
        max_length,
    )
    return ids, labels


@dataclass
class KtoCollator:
    """[(record, partner)] -> {"policy": rows, "kl": KL sequences, "desirable", "rows", ...}."""

    pad_token_id: int
    padding_free: bool = False
    segments: bool = False  # padded batches: describe each row's real tokens for segment attention
    max_length: int | None = None  # KL sequences longer than this keep their start (as TRL's collator)
    prefix_forest: bool = False  # each sub-batch one row, every prefix its sequences share computed once

    def __call__(self, items: list[tuple[KtoRecord, KtoRecord | None]]) -> dict:
        records = [record for record, _ in items]
        batch = {"policy": self.lay_out([(r.sequence.input_ids, r.sequence.labels) for r in records])}
        if items[0][1] is not None:
            batch["kl"] = self.lay_out([kl_sequence(r, p, self.max_length) for r, p in items])
        desirable = torch.tensor([r.desirable for r in records])
        batch["desirable"] = desirable
        batch["rows"] = torch.tensor([r.row for r in records])
        batch["pair_tokens"] = torch.tensor(sum(len(r.sequence) for r in records))
        # Trainer sums these over an optimizer step: the NLL on desirable rows divides by it.
        batch["chosen_tokens"] = torch.tensor(sum(r.sequence.trained_tokens for r in records if r.desirable))
        if records[0].reference is not None:
            batch["ref_logps"] = torch.tensor([r.reference[0] for r in records], dtype=torch.float32)
            batch["ref_kl_logps"] = torch.tensor([r.reference[1] for r in records], dtype=torch.float32)
        return batch

    def lay_out(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        if self.prefix_forest:
            return forest_row([(ids, labels, k) for k, (ids, labels) in enumerate(sequences)])
        ids = [torch.tensor(i) for i, _ in sequences]
        labels = [torch.tensor(label) for _, label in sequences]
        if self.padding_free:
            return packed(ids, labels)
        return padded(ids, labels, self.pad_token_id, self.segments)


def sub_batch_logps(model, sub_batch: dict, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and trained-token counts of a sub-batch's sequences ("policy" or "kl":
    one per row), in any layout."""
    return fused_sequence_logps(model, sub_batch, rows)
