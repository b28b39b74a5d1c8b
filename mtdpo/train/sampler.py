"""The order in which a run visits the pairs: a pure function of (seed, epoch), so a resumed run
replays the same batches on every rank. By default transformers' length grouping (pairs of
similar length together: less padding), vectorised; `--train-sampling-strategy random` shuffles.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler


class EpochSeededSampler(torch.utils.data.Sampler):
    """Indices in the order `order(n, generator)` drawn with a generator seeded by seed + epoch.

    transformers' LengthGroupedSampler shuffles with the global RNG, whose state after a resume
    differs from the uninterrupted run's: a run resumed inside epoch 2 trained some pairs twice
    and others never. Here the order depends on nothing but (seed, epoch), on every rank."""

    def __init__(self, order, n: int, seed: int):
        self.order, self.n, self.seed, self.epoch = order, n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.order(self.n, torch.Generator().manual_seed(self.seed + self.epoch)))


def random_order(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def length_grouped_order(lengths, batch_size: int):
    """transformers' length grouping (get_length_grouped_indices): shuffle, sort megabatches by
    length, longest batch first; the same indices for the same generator, vectorised."""
    lengths = np.asarray(lengths)
    return lambda n, generator: length_grouped_indices(lengths, batch_size, generator)


def length_grouped_indices(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> list[int]:
    """A random permutation cut into megabatches of up to 50 batches, each sorted longest first
    (stable, as Python's sorted(reverse=True) is), then the longest pair of all swapped to the
    front, so an out-of-memory error comes at the first step. transformers sorts each megabatch
    in Python; this sorts them all in one numpy call."""
    n = len(lengths)
    if n == 0:
        return []
    size = max(min(n // (batch_size * 4), 50), 1) * batch_size
    shuffled = torch.randperm(n, generator=generator).numpy()
    order = shuffled[np.lexsort((-lengths[shuffled], np.arange(n) // size))]  # by megabatch, then longest first
    longest = (
        int(np.argmax(lengths[order[::size]])) * size
    )  # the first element of the megabatch holding the longest pair
    order[0], order[longest] = order[longest], order[0]
    return order.tolist()


# ── micro-batches of whole problems (the prefix forest's unit) ───────────────


def group_batches(
    keys: np.ndarray, suffix: np.ndarray, prompt: np.ndarray, seed: int, batch_size: int, max_tokens: int = 0
) -> list[list[int]]:
    """Micro-batches that keep the pairs of one prompt (`keys`: a key per pair) together where
    the limits allow: at most `batch_size` pairs and, with `max_tokens`, at most that many forest
    tokens (a pair costs its `suffix` tokens, past the prompt, and its group's `prompt` once per
    micro-batch). A group that does not fit beside the micro-batch so far starts a new one; a
    group too big for any is cut. Groups come in an order drawn from `seed`, fixed across epochs
    (the sampler shuffles whole micro-batches per epoch). Every pair is in exactly one."""
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    groups: dict[int, list[int]] = {}
    for index in order:
        groups.setdefault(int(keys[index]), []).append(index)
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0

    def fits(pairs: int, cost: int) -> bool:
        return len(current) + pairs <= batch_size and (not max_tokens or tokens + cost <= max_tokens)

    for members in groups.values():
        members.sort()
        whole = int(prompt[members[0]]) + sum(int(suffix[k]) for k in members)
        if current and not fits(len(members), whole):
            batches.append(current)  # the group goes whole into the next micro-batch, or is cut from its start
            current, tokens = [], 0
        for at, index in enumerate(members):
            cost = int(suffix[index]) + (int(prompt[index]) if at == 0 or not current else 0)
            if current and not fits(1, cost):
                batches.append(current)
                current, tokens = [], 0
                cost = int(suffix[index]) + int(prompt[index])  # a new micro-batch holds the prompt again
            current.append(index)
            tokens += cost
    if current:
        batches.append(current)
    return batches


class GroupedBatchSampler(BatchRebalanceSampler):
    """Fixed micro-batches (`group_batches`) in an order drawn from (seed, epoch), each rank
    taking every world-th one. A `BatchRebalanceSampler` to transformers' Trainer, which then
    passes it to the DataLoader as its batch sampler (micro-batches of varying sizes) and leaves
    the rank split to it. Ranks get equal counts: the last micro-batches wrap around to the
    first ones, as a distributed sampler pads (documented in docs/SCALING.md)."""

    def __init__(self, batches: list[list[int]], seed: int, rank: int = 0, world: int = 1):
        self.batches, self.seed, self.rank, self.world, self.epoch = batches, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.batches) // self.world)

    def __iter__(self):
        order = torch.randperm(
            len(self.batches), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        padded = order + order[: len(self) * self.world - len(order)]
        return iter([self.batches[k] for k in padded[self.rank :: self.world]])
