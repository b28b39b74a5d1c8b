"""Micro-batches of whole problems (`--group-by-prompt`, `--max-tokens-per-batch`): the pairs of one
prompt land together where the limits allow, every pair once per epoch, the order a function of
(seed, epoch), ranks with equal shares; and a step of micro-batches of varying sizes is still the
mean over the step's pairs (the forest on grouped batches moves the weights as one padded batch
of every pair)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import datasets
import numpy as np
import pytest
from test_accumulation import SGD, largest_difference, weights
from test_resume import train_recording_rows
from test_train import run_config
from trainkit import make_cache, saved_start_model

from mtdpo.assets import ASSETS
from mtdpo.cache import open_caches
from mtdpo.cache.files import record_checksums
from mtdpo.cache.schema import PROBLEM
from mtdpo.errors import UsageError
from mtdpo.pairs import PairOptions, make_pairs_file
from mtdpo.train.run import train
from mtdpo.train.sampler import GroupedBatchSampler, group_batches

ROLLOUTS = ASSETS / "rollouts.jsonl"


def test_groups_stay_whole_where_they_fit_by_hand():
    # prompts a a b a c c c c c (keys 1, 2, 3), batches of 4 pairs
    keys = np.array([1, 1, 2, 1, 3, 3, 3, 3, 3])
    suffix, prompt = np.ones(9, int), np.full(9, 10)
    # seed 0 draws the groups in the order c, a, b: c (5 pairs) is cut 4 + 1, a (3) fits beside
    # c's last pair, b does not fit beside them and starts a micro-batch
    assert group_batches(keys, suffix, prompt, seed=0, batch_size=4) == [[4, 5, 6, 7], [8, 0, 1, 3], [2]]
    # seed 2: a, c, b: c does not fit beside a, so it starts a micro-batch and is cut; b joins its cut end
    assert group_batches(keys, suffix, prompt, seed=2, batch_size=4) == [[0, 1, 3], [4, 5, 6, 7], [8, 2]]


def test_the_token_budget_counts_a_prompt_once_per_micro_batch():
    keys = np.array([7, 7, 7, 8])
    suffix, prompt = np.array([5, 5, 5, 5]), np.array([20, 20, 20, 20])
    # group 7 costs 20 + 15 = 35; with 8 (25 more) 60
    assert sorted(map(sorted, group_batches(keys, suffix, prompt, 0, batch_size=8, max_tokens=60))) == [[0, 1, 2, 3]]
    cut = group_batches(keys, suffix, prompt, 0, batch_size=8, max_tokens=30)
    assert sorted(map(sorted, cut)) == [[0, 1], [2], [3]]  # 20 + 5 + 5; the rest holds the prompt again


@pytest.mark.parametrize("seed", range(5))
def test_every_pair_lands_in_exactly_one_micro_batch(seed):
    rng = np.random.default_rng(seed)
    n = 200
    keys, suffix, prompt = rng.integers(0, 30, n), rng.integers(1, 50, n), rng.integers(1, 100, n)
    prompt = prompt[keys]  # one prompt length per key
    for batch_size, budget in ((4, 0), (8, 300), (3, 120)):
        batches = group_batches(keys, suffix, prompt, seed, batch_size, budget)
        assert sorted(k for b in batches for k in b) == list(range(n))
        for b in batches:
            assert 1 <= len(b) <= batch_size
            cost = sum(int(suffix[k]) for k in b) + sum(int(prompt[k]) for k in {int(keys[k]): k for k in b}.values())
            assert not budget or len(b) == 1 or cost <= budget


def test_ranks_take_equal_shares_and_the_order_depends_on_seed_and_epoch_only():
    batches = [[k] for k in range(7)]
    ranks = [GroupedBatchSampler(batches, seed=3, rank=r, world=2) for r in range(2)]
    epoch0 = [list(s) for s in ranks]
    assert len(epoch0[0]) == len(epoch0[1]) == 4 == len(ranks[0])  # 7 micro-batches: one wraps around
    taken = sorted(k for share in epoch0 for b in share for k in b)
    assert set(taken) == set(range(7)) and len(taken) == 8  # every micro-batch, one twice
    assert epoch0 == [list(GroupedBatchSampler(batches, seed=3, rank=r, world=2)) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks] != epoch0


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """Pairs of `--rule all` (several per problem) from the bundled rollouts, preprocessed."""
    tmp = tmp_path_factory.mktemp("grouped")
    make_pairs_file(ROLLOUTS, tmp / "pairs.jsonl", PairOptions(rule="all", max_pairs_per_prompt=4), overwrite=True)
    rows = [json.loads(line) for line in (tmp / "pairs.jsonl").read_text().splitlines()][:18]
    assert len({r["prompt_id"] for r in rows}) < len(rows) / 2  # problems with several pairs
    return tmp, make_cache(tmp, rows=rows), saved_start_model(tmp / "init")


def test_the_pairs_of_a_problem_share_one_key(grouped):
    # what --group-by-prompt promises: one key per problem, so a problem's pairs can share a micro-batch
    tmp, cache, _ = grouped
    rows = [json.loads(line) for line in (tmp / "pairs.jsonl").read_text().splitlines()][:18]
    opened = open_caches([str(cache)])
    keys, _, _ = opened.pairs.prompts()
    problems = [r["prompt_id"] for r in rows]
    prompt_len = opened.prompt_lengths()
    assert len(set(zip(problems, prompt_len.tolist()))) > len(set(problems))  # the fixture has such pairs
    assert len(set(zip(problems, keys.tolist()))) == len(set(problems)) == len(set(keys.tolist()))


def test_a_problem_costs_the_tokens_its_pairs_share_once_and_each_pair_its_own(grouped):
    _, cache, _ = grouped
    opened = open_caches([str(cache)])
    keys, suffix, shared = opened.pairs.prompts()
    pairs, prompt_len = opened.pairs.__getitems__(list(range(len(keys)))), opened.prompt_lengths()
    for key in set(keys.tolist()):
        members = np.flatnonzero(keys == key)
        prompts = [pairs[i].chosen.input_ids[: prompt_len[i]] for i in members]
        assert {int(shared[i]) for i in members} == {len(os.path.commonprefix(prompts))}
    for i, pair in enumerate(pairs):  # the pair's prompt past the problem's prefix once, then each side
        assert suffix[i] == len(pair.chosen) + len(pair.rejected) - prompt_len[i] - shared[i]
    assert (shared <= prompt_len).all() and (shared < prompt_len).any()


def test_a_cache_written_before_problem_keys_groups_by_prompt_tokens(grouped):
    _, cache, _ = grouped
    opened = open_caches([str(cache)])
    old = dataclasses.replace(opened, dataset=opened.dataset.remove_columns([PROBLEM]))
    keys, suffix, shared = old.prompts()
    prompt_len = opened.prompt_lengths()
    assert (shared == prompt_len).all()  # a key's pairs share their whole prompt
    assert (suffix == opened.lengths("chosen") + opened.lengths("rejected") - 2 * prompt_len).all()
    assert len(set(keys.tolist())) > len(set(opened.pairs.prompts()[0].tolist()))  # a problem split by prompt_len


def test_a_cache_written_before_problem_keys_opens_beside_a_newer_one(grouped, tmp_path):
    _, cache, _ = grouped
    old = tmp_path / "old"  # the same cache as an earlier mtdpo wrote it: no problem column
    shutil.copytree(cache, old)
    datasets.load_from_disk(str(cache)).remove_columns([PROBLEM]).save_to_disk(str(tmp_path / "shards"))
    for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json"):
        shutil.copy(tmp_path / "shards" / name, old / name)
    record_checksums(old, ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"])
    for order in ([cache, old], [old, cache]):
        opened = open_caches([str(c) for c in order])
        assert PROBLEM not in opened.dataset.column_names and len(opened.prompt_lengths()) == 36
        _, _, shared = opened.pairs.prompts()
        assert (shared == opened.prompt_lengths()).all()  # keys from prompt tokens, for both caches


def test_a_step_of_grouped_forest_micro_batches_equals_one_padded_batch_of_every_pair(grouped, tmp_path):
    tmp, cache, init = grouped
    keys, suffix, prompt = open_caches([str(cache)]).pairs.prompts()
    micro = group_batches(keys, suffix, prompt, 42, batch_size=4)
    assert len({len(b) for b in micro}) > 1  # micro-batches of varying sizes
    runs = {}
    for name, options in (
        ("forest", dict(per_device_train_batch_size=4, gradient_accumulation_steps=len(micro), prefix_forest=True)),
        ("padded", dict(per_device_train_batch_size=18, prefix_sharing=False)),
    ):
        runs[name] = tmp_path / name
        train(run_config(cache, tmp, output_dir=str(runs[name]), model=str(init), **{**SGD, **options}))
    assert largest_difference(weights(runs["forest"]), weights(runs["padded"])) < 1e-5


def test_grouped_batches_keep_a_problem_together_and_resume_exactly(grouped, tmp_path, monkeypatch):
    tmp, cache, _ = grouped
    options = dict(max_steps=-1, num_train_epochs=2, prefix_forest=True, per_device_train_batch_size=4)
    straight = tmp_path / "straight"
    rows = train_recording_rows(
        run_config(cache, tmp, output_dir=str(straight), save_strategy="steps", save_steps=3, **options), monkeypatch
    )
    steps = sorted(rows)
    half = len(steps) // 2
    for epoch in (steps[:half], steps[half:]):
        assert sorted(r for step in epoch for r in rows[step]) == list(range(18))
    assert [rows[s] for s in steps[:half]] != [rows[s] for s in steps[half:]]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint-3").symlink_to(straight / "checkpoint-3", target_is_directory=True)
    again = train_recording_rows(
        run_config(cache, tmp, output_dir=str(resumed), resume_from_checkpoint="auto", **options), monkeypatch
    )
    assert again == {s: rows[s] for s in steps if s > 3}


def test_grouping_needs_the_step_loss_scope(grouped):
    with pytest.raises(UsageError, match="--loss-scope step"):
        run_config(grouped[1], grouped[0], group_by_prompt=True, loss_scope="micro_batch")
