"""Batches from the memory-mapped cache: pad to the longest sequence, chosen then rejected."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from trl.trainer.utils import pad

from mtdpo.cache import IGNORE_INDEX, REF_COLUMNS

@dataclass
class PairCollator:
    """rows -> input_ids/labels/attention_mask of shape [2B, T]: B chosen rows, then B rejected."""

    pad_token_id: int
    padding_free: bool = False  # one row of all 2B sequences instead of a padded [2B, T]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sides = [f"{side}_{{}}" for side in ("chosen", "rejected")]
        ids = [torch.tensor(r[side.format("input_ids")]) for side in sides for r in rows]
        labels = [torch.tensor(r[side.format("labels")]) for side in sides for r in rows]
        batch = packed(ids, labels) if self.padding_free else {
            "input_ids": pad(ids, padding_value=self.pad_token_id),
            "labels": pad(labels, padding_value=IGNORE_INDEX),
            "attention_mask": pad([torch.ones_like(t) for t in ids], padding_value=0),
        }  # fmt: skip
        batch["rows"] = torch.tensor([r["row"] for r in rows])
        if all(column in rows[0] for column in REF_COLUMNS):
            batch["ref_logps"] = torch.tensor([r[c] for c in REF_COLUMNS for r in rows], dtype=torch.float32)
        # Trained chosen tokens (a label predicts from the token before it: never the first), in
        # every layout: Trainer sums them over an optimizer step to normalise the NLL.
        batch["chosen_tokens"] = torch.tensor(sum(int(np.count_nonzero(np.asarray(r["chosen_labels"][1:]) != IGNORE_INDEX)) for r in rows))
        return batch


def packed(ids: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sequences end to end in one row, positions restarting at each (no attention mask):
    transformers then keeps each sequence's attention to itself (flash-attn varlen on GPU,
    a block-causal mask for sdpa/eager). `sequence_index` says which sequence a token is in."""
    # A sequence's first token is never predicted from the previous sequence's last one.
    labels = [torch.cat([torch.tensor([IGNORE_INDEX]), t[1:]]) for t in labels]
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat([torch.arange(len(t)) for t in ids])[None],
        "sequence_index": torch.cat([torch.full((len(t),), i) for i, t in enumerate(ids)])[None],
    }
