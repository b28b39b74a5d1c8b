"""Resume replays the same batches: from any checkpoint, in any epoch, for every sampler.

16 pairs, batch 2, 2 epochs = 16 steps (8 per epoch). Before the fix, a run resumed at step 10
(inside epoch 2) with the default length-grouped sampler trained pairs 0, 2 and 13 twice and
6, 12 and 14 never (bench/measure_exactness.py prints the before/after numbers). The 2-rank
case is in tests/train/test_multinode.py (slow).
"""

import shutil

import numpy as np
import pytest
import torch
from test_train import logged, run_config
from trainkit import make_cache
from transformers.trainer_pt_utils import get_length_grouped_indices

from mtdpo.cache import pair_lengths
from mtdpo.train.run import train
from mtdpo.train.sampler import EpochSeededSampler, length_grouped_indices, length_grouped_order, random_order
from mtdpo.train.trainer import MultiTurnDPOTrainer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("resume"), n=16)


def train_recording_rows(config, monkeypatch) -> dict[int, list[int]]:
    """Train; return step -> the source rows of that step's batch."""
    trained = {}
    compute_loss = MultiTurnDPOTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            trained[self.state.global_step + 1] = inputs["rows"].tolist()
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(MultiTurnDPOTrainer, "compute_loss", recording)
    train(config)
    monkeypatch.undo()
    return trained


@pytest.mark.parametrize(
    "strategy, checkpoints", [("group_by_length", (10, 8)), ("random", (10,)), ("sequential", (10,))]
)
def test_resume_replays_the_same_rows_and_losses(cache, tmp_path, monkeypatch, strategy, checkpoints):
    """Checkpoint 10 lies inside epoch 2, checkpoint 8 on the epoch boundary."""
    straight = tmp_path / "straight"
    options = dict(max_steps=-1, num_train_epochs=2, train_sampling_strategy=strategy)
    rows = train_recording_rows(
        run_config(cache, tmp_path, output_dir=str(straight), save_strategy="steps", save_steps=2, **options),
        monkeypatch,
    )
    assert sorted(rows) == list(range(1, 17))
    epochs = [sorted(r for step in steps for r in rows[step]) for steps in (range(1, 9), range(9, 17))]
    assert epochs[0] == epochs[1] == list(range(16))  # every pair once per epoch
    if strategy != "sequential":  # a new shuffle in epoch 2
        assert [rows[step] for step in range(1, 9)] != [rows[step] for step in range(9, 17)]
    for checkpoint in checkpoints:
        resumed = tmp_path / f"resumed-{checkpoint}"
        resumed.mkdir()
        shutil.copytree(straight / f"checkpoint-{checkpoint}", resumed / f"checkpoint-{checkpoint}")
        again = train_recording_rows(
            run_config(cache, tmp_path, output_dir=str(resumed), resume_from_checkpoint="auto", **options), monkeypatch
        )
        later = range(checkpoint + 1, 17)
        assert sorted(again) == list(later)
        assert {step: again[step] for step in later} == {step: rows[step] for step in later}
        before, after = logged(straight), logged(resumed)
        for step in later:
            assert after[step] == pytest.approx(before[step], abs=1e-6)
        assert len({round(before[step], 4) for step in later}) > 1  # the weights moved: the losses differ


@pytest.mark.parametrize("order", [random_order, length_grouped_order([5, 1, 9, 3, 7, 2, 8, 6, 4, 10, 12, 11], 2)])
def test_the_order_is_a_function_of_seed_and_epoch_only(order):
    def epoch(seed, n):
        sampler = EpochSeededSampler(order, 12, seed)
        sampler.set_epoch(n)
        torch.manual_seed(n * 7 + 1)  # the global RNG must not matter
        return list(sampler)

    assert sorted(epoch(42, 0)) == list(range(12))
    assert epoch(42, 1) == epoch(42, 1)
    assert epoch(42, 0) != epoch(42, 1)
    assert epoch(42, 1) != epoch(43, 1)


def test_length_grouping_by_hand():
    # 8 pairs, batch 1: megabatches of max(min(8 // 4, 50), 1) = 2 pairs. The permutation of
    # seed 0 is fixed by torch; each megabatch is sorted longest first, ties in permuted order,
    # and the longest pair of all (10) is swapped to the front.
    lengths = np.array([3, 10, 3, 7, 1, 7, 2, 5])
    shuffled = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    megabatches = [sorted(shuffled[i : i + 2], key=lambda k: -lengths[k]) for i in range(0, 8, 2)]
    flat = [k for megabatch in megabatches for k in megabatch]
    front = flat.index(1)
    assert front % 2 == 0  # the longest pair leads its megabatch
    flat[0], flat[front] = flat[front], flat[0]
    assert length_grouped_indices(lengths, 1, torch.Generator().manual_seed(0)) == flat
    assert flat[0] == 1


@pytest.mark.parametrize("n, batch", [(1, 4), (7, 2), (100, 3), (1000, 8), (5000, 1)])
def test_length_grouping_equals_transformers(n, batch):
    rng = np.random.default_rng(n)
    lengths = rng.integers(1, 12, size=n).astype(np.int32)  # few distinct values: many ties
    for seed in range(3):
        expected = get_length_grouped_indices(lengths.tolist(), batch, generator=torch.Generator().manual_seed(seed))
        assert length_grouped_indices(lengths, batch, torch.Generator().manual_seed(seed)) == expected


def test_pair_lengths_reads_the_longer_side_with_and_without_an_index_mapping(cache):
    from helpers import cache_dataset

    dataset = cache_dataset(cache)
    longer = [max(a, b) for a, b in zip(dataset["chosen_len"], dataset["rejected_len"])]
    assert pair_lengths(dataset).tolist() == longer
    picked = [5, 0, 11, 3]
    assert pair_lengths(dataset.select(picked)).tolist() == [longer[k] for k in picked]
    assert len(set(longer)) > 1  # the pairs differ in length: the comparison can fail
