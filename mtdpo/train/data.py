"""Batches from the memory-mapped cache, in one of three layouts (the same log-probs in each, tested):

- padded: [2B, T], B chosen rows then B rejected, right-padded to the longest;
- packed (padding-free): the 2B sequences end to end in one row;
- shared (prefix sharing): one stretch per pair, prompt + chosen + rejected, in one row, so
  the prompt the two sides share goes through the model once.

Packed and shared rows carry `segments` (which queries see which keys, for
`attention.segment_attention`) and `logp_index` (which predicted position counts for which
sequence); `pair_tokens` counts the tokens of both sequences of every pair, the same number in
every layout, for tokens/s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.utils import pad

from mtdpo.cache import IGNORE_INDEX, SIDES, PairRecord
from mtdpo.train.forest import Forest, build_forest


@dataclass
class PairCollator:
    """rows -> a batch whose sequences are B chosen, then B rejected (indices 0..2B-1)."""

    pad_token_id: int
    padding_free: bool = False  # one row of all 2B sequences instead of a padded [2B, T]
    prefix_sharing: bool = False  # one row of B prompt + chosen + rejected stretches (implies no padding)
    segments: bool = False  # padded batches: also describe each row's real tokens for segment attention
    prefix_forest: bool = False  # one row, every prefix the batch's sequences share computed once

    def __call__(self, rows: list[dict | PairRecord]) -> dict[str, torch.Tensor]:
        pairs = [r if isinstance(r, PairRecord) else PairRecord.from_row(r) for r in rows]
        if self.prefix_forest:
            batch = forest_batch(pairs)
        elif self.prefix_sharing:
            batch = shared(pairs)
        else:
            # Each sequence of each side, and the side (0..2B-1) its log-prob counts for.
            sides = [(p.side(side), k) for k, (side, p) in enumerate((s, p) for s in SIDES for p in pairs)]
            pieces = [(piece, k) for side, k in sides for piece in side.pieces()]
            ids = [torch.tensor(piece.input_ids) for piece, _ in pieces]
            labels = [torch.tensor(piece.labels) for piece, _ in pieces]
            owners = [k for _, k in pieces]
            if self.padding_free:
                batch = packed(ids, labels, owners)
            else:
                batch = padded(ids, labels, self.pad_token_id, self.segments)
                if len(pieces) > len(sides):  # a side of several sequences: rows are summed into sides
                    batch["sequence_side"] = torch.tensor(owners)
        batch["pair_tokens"] = torch.tensor(sum(len(p.chosen) + len(p.rejected) for p in pairs))
        batch["rows"] = torch.tensor([p.row for p in pairs])
        if pairs[0].reference is not None:
            batch["ref_logps"] = torch.tensor([p.reference[k] for k in (0, 1) for p in pairs], dtype=torch.float32)
        # Trainer sums them over an optimizer step to normalise the NLL (the same count in every layout).
        batch["chosen_tokens"] = torch.tensor(sum(p.chosen.trained_tokens for p in pairs))
        return batch


def padded(
    ids: list[torch.Tensor], labels: list[torch.Tensor], pad_token_id: int, segments: bool = False
) -> dict[str, torch.Tensor]:
    batch = {
        "input_ids": pad(ids, padding_value=pad_token_id),
        "labels": pad(labels, padding_value=IGNORE_INDEX),
        "attention_mask": pad([torch.ones_like(t) for t in ids], padding_value=0),
    }
    if segments:  # one causal segment per row, over its real tokens: padding is never attended to
        batch["segments"] = torch.tensor([[row, 0, len(t), 0, 0] for row, t in enumerate(ids)])
    return batch


def packed(
    ids: list[torch.Tensor], labels: list[torch.Tensor], owners: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Sequences end to end in one row, positions restarting at each (no attention mask), each
    scored for the side `owners` names (by default its own index). With segment attention each
    sequence attends to itself; flash-attn's varlen kernel (GPU) reads the same boundaries from
    the positions."""
    owners = owners or list(range(len(ids)))
    starts = torch.tensor([0, *(len(t) for t in ids)]).cumsum(0).tolist()
    # A sequence's first token is never predicted from the previous sequence's last one.
    labels = [torch.cat([torch.tensor([IGNORE_INDEX]), t[1:]]) for t in labels]
    index = [
        (start + t, owner)
        for owner, start, lab in zip(owners, starts, labels)
        for t in (lab != IGNORE_INDEX).nonzero()[:, 0].tolist()
    ]
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat([torch.arange(len(t)) for t in ids])[None],
        "segments": torch.tensor([[0, s, e, 0, 0] for s, e in zip(starts, starts[1:])]),
        "logp_index": _logp_index(index),
    }


def shared_pair(pair: PairRecord) -> dict[str, torch.Tensor | list]:
    """One pair as one stretch: prompt + chosen suffix, then the rejected branch.

    With p = prompt_len shared tokens, the rejected branch is rejected_ids[p-1:]: it starts with
    a second copy of the prompt's last token, at that token's position p-1, attending to the
    first p-1 prompt tokens. That copy computes exactly the hidden state of the original (same
    token, position and context), so it predicts rejected's first own token; the original
    predicts chosen's. Positions then continue p, p+1, ... as in the rejected sequence alone.

    Trained tokens inside the prompt (a common token prefix past the prompt messages) are scored
    once, in the trunk, and count for each side whose label trains them. A side of several
    sequences shares its first one this way; the others follow as segments of their own. Returns
    the stretch's ids, labels, positions, its segments and its (position, side) scoring pairs,
    with side 0 = chosen, 1 = rejected; positions are relative to the stretch.
    """
    (first_chosen, *more_chosen), (first_rejected, *more_rejected) = pair.chosen.pieces(), pair.rejected.pieces()
    c_ids, c_lab = first_chosen.input_ids, first_chosen.labels
    r_ids, r_lab = first_rejected.input_ids, first_rejected.labels
    p = pair.prompt_len
    s = max(p - 1, 0)  # where the rejected branch starts; its context is trunk[:s]
    if list(c_ids[:p]) != list(r_ids[:p]):
        raise ValueError(f"row {pair.row}: prompt_len {p} is not a common prefix of chosen and rejected")
    n = len(c_ids)
    trunk_labels = [IGNORE_INDEX] * n
    score = []  # (label position in the stretch, side)
    for t in range(1, n):
        sides = [0] if c_lab[t] != IGNORE_INDEX else []
        if t < p and r_lab[t] != IGNORE_INDEX:
            sides.append(1)  # the same token in the same context: its log-prob counts for rejected too
        if sides:
            trunk_labels[t] = c_ids[t]
            score += [(t, side) for side in sides]
    branch_ids = list(r_ids[s:])
    branch_labels = [IGNORE_INDEX, *r_lab[s + 1 :]]  # the copy itself is not predicted from chosen's last token
    score += [(n + k, 1) for k, label in enumerate(branch_labels) if label != IGNORE_INDEX]
    stretch = {
        "input_ids": [*c_ids, *branch_ids],
        "labels": [*trunk_labels, *branch_labels],
        "position_ids": [*range(n), *range(s, s + len(branch_ids))],
        "segments": [(0, n, 0, 0), (n, n + len(branch_ids), 0, s)],
        "score": score,
    }
    for side, piece in [*((0, p) for p in more_chosen), *((1, p) for p in more_rejected)]:
        start = len(stretch["input_ids"])
        labels = [IGNORE_INDEX, *piece.labels[1:]]  # a sequence's first token is never predicted
        stretch["input_ids"] += piece.input_ids
        stretch["labels"] += labels
        stretch["position_ids"] += range(len(piece))
        stretch["segments"].append((start, start + len(piece), 0, 0))
        stretch["score"] += [(start + k, side) for k, label in enumerate(labels) if label != IGNORE_INDEX]
    return stretch


def shared(pairs: list[PairRecord]) -> dict[str, torch.Tensor]:
    """B pairs, each a `shared_pair` stretch, end to end in one row."""
    ids, labels, positions, segments, index = [], [], [], [], []
    b = len(pairs)
    for i, pair in enumerate(pairs):
        stretch, offset = shared_pair(pair), len(ids)
        ids += stretch["input_ids"]
        labels += stretch["labels"]
        positions += stretch["position_ids"]
        segments += [
            [0, start + offset, end + offset, cs + offset, ce + offset] for start, end, cs, ce in stretch["segments"]
        ]
        index += [(t + offset, i + side * b) for t, side in stretch["score"]]
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "segments": torch.tensor(segments),
        "logp_index": _logp_index(index),
    }


def forest_batch(pairs: list[PairRecord]) -> dict[str, torch.Tensor | list]:
    """B pairs as one prefix forest: each sequence of each side, scored for its side (0..B-1
    chosen, B..2B-1 rejected)."""
    sides = [p.side(side) for side in SIDES for p in pairs]
    sequences = [(piece.input_ids, piece.labels, k) for k, side in enumerate(sides) for piece in side.pieces()]
    return forest_row(build_forest(sequences))


def forest_row(tree: Forest) -> dict[str, torch.Tensor | list]:
    """A prefix forest (forest.py: the sequences' (input_ids, labels, owner)) as one batch row,
    each trained token scored for its owner."""
    return {
        "input_ids": torch.tensor([tree.input_ids]),
        "labels": torch.tensor([tree.labels]),
        "position_ids": torch.tensor([tree.positions]),
        "segments": [[0, c.start, c.end, *(bound for span in c.context for bound in span)] for c in tree.chains],
        "logp_index": _logp_index(tree.score),
    }


def _logp_index(index: list[tuple[int, int]]) -> torch.Tensor:
    """[2, M]: the shifted log-prob position (label position - 1) and the sequence it counts for."""
    return torch.tensor([[t - 1 for t, _ in index], [seq for _, seq in index]], dtype=torch.long).reshape(2, -1)
