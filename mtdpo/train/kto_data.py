"""KTO batches: each row of a KTO cache with its KL sequence, in the padded or packed layout.

KTO's reference point z0 is estimated on mismatched sequences: a row's prompt followed by the
completion of its *KL partner*, another row (kto_loss.py). Which row is TRL's rule on the dataset
order: in each chunk of per-device-train-batch-size rows, a row takes the previous row's
completion and the chunk's first row the chunk's last one's. The partner is a pure function of the
row's position and that batch size (`kto_loss.kl_partner`), so `KtoRows` hands each row out with
its partner whatever the sampler's order (sequential, length-grouped, random, resumed), and the
collator builds the KL sequence in token space (`kto_loss.mismatched_sequence`). With TRL's
sequential order on one device the partner is in the same batch, as in TRL.

A batch holds two sub-batches: "policy" (the rows, whose log-probs are trained) and "kl" (their
KL sequences, forwarded without gradient); with `--padding-free` each is one packed row, with
`--prefix-forest` one forest row (forest.py: the rows of one problem, grouped into one
micro-batch by `--group-by-prompt`, compute their prompt once). A KL sequence starts with its
row's prompt, which the rows' forward computes anyway: with segment attention the "kl" sub-batch
holds only each KL sequence's continuation (from the prompt's last token on, `continuations`),
attending to the prompt's keys and values as the rows' forward left them (`kto_logps`), so a
prompt goes through each model once per row, not twice. Other attention kernels get whole KL
sequences laid out as the rows are. A KL sequence that is a row of the batch (`same_rows`) is not
forwarded at all: it takes that row's log-probs.

`pair_tokens` counts the rows' tokens, the ones trained (forward and backward): the tokens/s and
MFU of a KTO run count those, as a DPO run's count both sides of its pairs (and, as there,
neither the reference's forwards nor, here, the KL sequences').
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mtdpo.cache import KtoRecord, OpenCache, kto_lengths
from mtdpo.train.attention import KeptKeys
from mtdpo.train.data import forest_row, packed, padded
from mtdpo.train.forest import build_forest
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


def kl_sequence(
    record: KtoRecord, partner: KtoRecord, max_length: int | None = None
) -> tuple[list[int], list[int], int]:
    """The row's prompt + the partner's completion, as (input_ids, labels, prompt_len)."""
    return mismatched_sequence(
        (record.sequence.input_ids, record.sequence.labels, record.prompt_len),
        (partner.sequence.input_ids, partner.sequence.labels, partner.prompt_len),
        max_length,
    )


@dataclass
class KtoCollator:
    """[(record, partner)] -> {"policy": rows, "kl": KL sequences, "desirable", "rows", ...}."""

    pad_token_id: int
    padding_free: bool = False
    segments: bool = False  # segment attention: padded rows say their tokens, KL sequences continue prompts
    max_length: int | None = None  # KL sequences longer than this keep their start (as TRL's collator)
    prefix_forest: bool = False  # each sub-batch one row, every prefix its sequences share computed once
    continue_prompts: bool = True  # with segments; False: whole KL sequences (what bench/train.py compares)

    def __call__(self, items: list[tuple[KtoRecord, KtoRecord | None]]) -> dict:
        records = [record for record, _ in items]
        batch = {}
        batch["policy"], places = self.lay_out([(r.sequence.input_ids, r.sequence.labels) for r in records])
        if items[0][1] is not None:
            kl = [kl_sequence(r, p, self.max_length) for r, p in items]
            same = same_rows(records, kl)
            # Every rank forwards a KL sub-batch, one sequence at least (ZeRO-3 gathers the
            # weights of each forward with collectives all ranks must join).
            todo = [k for k, j in enumerate(same) if j < 0] or [0]
            same[todo[0]] = -1
            if self.segments and self.continue_prompts:
                batch["kl"] = continuations([(k, kl[k]) for k in todo], places)
            else:
                batch["kl"] = self.lay_out([kl[k][:2] for k in todo])[0]
            batch["kl_index"], batch["kl_same_as_row"] = torch.tensor(todo), torch.tensor(same)
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

    def lay_out(self, sequences: list[tuple[list[int], list[int]]]):
        """The sub-batch of these sequences, and `places(k, n)`: where the first n tokens of
        sequence k lie in it."""
        if self.prefix_forest:
            tree = build_forest([(ids, labels, k) for k, (ids, labels) in enumerate(sequences)])
            return forest_row(tree), lambda k, n: [(0, a, b) for a, b in tree.places(k, n)]
        ids = [torch.tensor(i) for i, _ in sequences]
        labels = [torch.tensor(label) for _, label in sequences]
        if self.padding_free:
            starts = [0, *np.cumsum([len(t) for t in ids]).tolist()]
            return packed(ids, labels), lambda k, n: [(0, starts[k], starts[k] + n)]
        return padded(ids, labels, self.pad_token_id, self.segments), lambda k, n: [(k, 0, n)]


def same_rows(records: list[KtoRecord], kl) -> list[int]:
    """For each KL sequence, a row of the batch it is token for token (-1: none). A row whose
    partner answers the same prompt (the neighbours of one problem, as `mtdpo pairs --kto`
    writes them) borrows a completion that already follows that prompt: its KL sequence is the
    partner's row, whose log-probs the rows' forward computes anyway."""
    rows = {}
    for j, record in enumerate(records):
        rows.setdefault((tuple(record.sequence.input_ids), tuple(record.sequence.labels)), j)
    return [rows.get((tuple(ids), tuple(labels)), -1) for ids, labels, _ in kl]


def continuations(kl: list[tuple[int, tuple[list[int], list[int], int]]], places) -> dict:
    """KL sequences (row k, (input_ids, labels, prompt_len)) as the continuations of their rows'
    prompts, end to end in one row (`data.packed`): each from its prompt's last token on, at its
    own positions, attending first to the prompt's other tokens where the rows' sub-batch holds
    them (`earlier_context`, from `places`). The prompt's last token is computed again (as
    `data.shared_pair`'s branch copy) because it predicts the completion's first token."""
    ids, labels, starts, context = [], [], [], []
    for k, (kl_ids, kl_labels, prompt_len) in kl:
        start = max(prompt_len - 1, 0)
        ids.append(torch.tensor(kl_ids[start:]))
        labels.append(torch.tensor(kl_labels[start:]))
        starts.append(start)
        context.append(places(k, start))
    batch = packed(ids, labels)
    batch["position_ids"] = torch.cat([torch.arange(s, s + len(t)) for s, t in zip(starts, ids)])[None]
    batch["earlier_context"] = context
    return batch


def kto_logps(model, batch: dict, with_kl: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A model's summed log-probs of the rows (with gradient where it is enabled), their
    trained-token counts, and the summed log-probs of their KL sequences (never with gradient;
    None without `with_kl` or a "kl" sub-batch): those the "kl" sub-batch holds (`kl_index`),
    the others their rows' (`kl_same_as_row`)."""
    with_kl = with_kl and "kl" in batch
    kept = KeptKeys() if with_kl and "earlier_context" in batch["kl"] else None
    logps, tokens = fused_sequence_logps(model, batch["policy"], len(batch["rows"]), keep_keys=kept)
    if not with_kl:
        return logps, tokens, None
    index = batch["kl_index"]
    with torch.no_grad():
        computed = fused_sequence_logps(model, batch["kl"], len(index), earlier_keys=kept)[0]
    kl_logps = logps.detach()[batch["kl_same_as_row"].clamp(min=0)].index_copy(0, index, computed)
    return logps, tokens, kl_logps
