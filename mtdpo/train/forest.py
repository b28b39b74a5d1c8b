"""The prefix-forest layout: a micro-batch as a forest of token trees, every distinct prefix
computed once.

The sequences of a micro-batch (every sequence of every side of every pair: a problem's prompt
shared by all its pairs, a trajectory used by several pairs, the long history a side scored in
several generation contexts repeats) are laid out as one row in which each distinct prefix
appears once. Sorted, consecutive sequences share their longest common prefix; a sequence adds
only its tokens past the prefix it shares with the one before it, as a *chain* that attends to
its ancestors' chains (its path from the root) and causally to itself. Where the new tokens part
from a path that goes on (two children of one node), the chain starts with a copy of the last
shared token, at that token's position, attending to the ancestors before it: that copy computes
exactly the hidden state of the original, so it predicts the new branch's first token while the
original predicts the other branch's (the trick of prefix sharing, `data.shared_pair`, for any
number of branches). Positions are depths in the tree.

Each sequence's trained tokens are scored at their places in the row, for the side (`owner`)
the sequence belongs to; a token shared by several sequences is computed once and counts for
each of them that trains it. So summed log-probs equal those of each sequence alone (tested
against the padded layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtdpo.cache import IGNORE_INDEX
from mtdpo.preprocess.tokens import common_prefix_length


@dataclass(frozen=True)
class Chain:
    """Row positions [start, end) holding path depths [depth, depth + end - start), attending to
    the row ranges `context` (its ancestors) and causally to itself. A `copy` chain's first
    token repeats the last shared token of the branch it leaves (never scored there)."""

    start: int
    end: int
    depth: int
    context: tuple[tuple[int, int], ...]
    copy: bool = False

    def holds(self, depth: int) -> bool:
        return self.depth <= depth < self.depth + self.end - self.start


@dataclass
class Forest:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)
    score: list[tuple[int, int]] = field(default_factory=list)  # (row position of a trained token, owner)
    paths: dict[int, list[Chain]] = field(default_factory=dict)  # owner -> the chains of its path, root first

    def __len__(self) -> int:
        return len(self.input_ids)

    def places(self, owner: int, depth: int) -> list[tuple[int, int]]:
        """The row ranges holding depths [0, depth) of `owner`'s sequence (its first tokens)."""
        return _ranges(self.paths[owner], depth)


def build_forest(sequences: list[tuple[list[int], list[int], int]]) -> Forest:
    """`sequences`: (input_ids, labels, owner) each. Returns the forest row."""
    forest = Forest()
    path: list[Chain] = []  # the chains of the previous sequence's path, root first
    previous: list[int] = []
    for ids, labels, owner in sorted(sequences, key=lambda s: s[0]):
        shared = common_prefix_length(ids, previous)
        path = [chain for chain in path if chain.depth < shared]  # the rest belongs to another branch
        if shared < len(ids):
            # The previous path ends where this one goes on (sorted: a prefix comes first), so the
            # last token in the row is this sequence's token shared - 1; else a copy of it starts the chain.
            copy = 0 < shared < len(previous)
            first = shared - copy
            start = len(forest)
            forest.input_ids += ids[first:]
            forest.labels += [IGNORE_INDEX] * (len(ids) - first)
            forest.positions += range(first, len(ids))
            chain = Chain(start, len(forest), first, tuple(_ranges(path, first)), bool(copy))
            forest.chains.append(chain)
            path = [*path, chain]
        _score(forest, path, ids, labels, owner)
        forest.paths[owner] = path
        previous = ids
    return forest


def forest_tokens(sequences: list[list[int]]) -> int:
    """The length of `build_forest`'s row for these sequences (input_ids each), without building
    it: every distinct prefix once, plus a copied token where a branch leaves a path that goes on."""
    total, previous = 0, []
    for ids in sorted(sequences):
        shared = common_prefix_length(ids, previous)
        if shared < len(ids):
            total += len(ids) - shared + (0 < shared < len(previous))
        previous = ids
    return total


def _ranges(path: list[Chain], depth: int) -> list[tuple[int, int]]:
    """The row ranges of a path's depths [0, depth): each chain up to where the next one on the
    path takes over (a copy chain takes over from the chain it branches from)."""
    out = []
    for chain, after in zip(path, [*path[1:], None]):
        stop = min(chain.depth + chain.end - chain.start, depth, after.depth if after else depth)
        if chain.depth < stop:
            out.append((chain.start, chain.start + stop - chain.depth))
    return out


def _score(forest: Forest, path: list[Chain], ids: list[int], labels: list[int], owner: int) -> None:
    """Mark the sequence's trained tokens at their row positions, each where the position before
    it in the row is the token before it on the path: the deepest chain holding the depth, but
    never a copy chain's first token (its original, further up, is the one predicted in context)."""
    for depth in range(1, len(ids)):
        if labels[depth] == IGNORE_INDEX:
            continue
        chain = next(c for c in reversed(path) if c.holds(depth) and not (c.copy and depth == c.depth))
        at = chain.start + depth - chain.depth
        forest.labels[at] = ids[depth]
        forest.score.append((at, owner))
