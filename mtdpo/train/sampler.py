"""The order in which a run visits the pairs: a pure function of (seed, epoch), so a resumed run
replays the same batches on every rank. By default transformers' length grouping (pairs of
similar length together: less padding), vectorised; `--train-sampling-strategy random` shuffles.
"""

from __future__ import annotations

import numpy as np
import torch


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
