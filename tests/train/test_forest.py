"""The prefix forest: every scored token is predicted from exactly the tokens before it in its own
sequence, at the same positions (checked structurally on random sequence sets), each distinct
prefix is computed once, and a model gives the padded layout's log-probs, losses and gradients."""

from __future__ import annotations

import random

import pytest
import torch
from trainkit import loss_metrics_grads, make_cache, mtdpo_trainer, tiny_model

from mtdpo.cache import IGNORE_INDEX, PairRecord, Sequence
from mtdpo.train.attention import SEGMENT_ATTENTION
from mtdpo.train.data import PairCollator
from mtdpo.train.forest import build_forest, forest_tokens
from mtdpo.train.forward import fused_sequence_logps

X = IGNORE_INDEX


def visible(forest, at: int) -> list[tuple[int, int]]:
    """(token, position) pairs the row position `at` attends to, in order: its chain's context
    ranges, then its chain up to itself."""
    chain = next(c for c in forest.chains if c.start <= at < c.end)
    spans = [*chain.context, (chain.start, at + 1)]
    return [(forest.input_ids[k], forest.positions[k]) for a, b in spans for k in range(a, b)]


def check(sequences):
    forest = build_forest(sequences)
    scored = {}
    for at, owner in forest.score:
        scored.setdefault(owner, []).append(at)
    for owner, (ids, labels, _) in enumerate(sequences):
        trained = [d for d in range(1, len(ids)) if labels[d] != X]
        places = sorted(scored.get(owner, []))
        assert len(places) == len(trained), (owner, places, trained)
        for at in places:
            depth = forest.positions[at]
            assert forest.input_ids[at] == ids[depth] and forest.labels[at] == ids[depth]
            # the row position before it sees exactly this sequence's tokens before `depth`
            assert visible(forest, at - 1) == [(ids[d], d) for d in range(depth)], (owner, depth)
    return forest


def test_a_pair_sharing_a_prompt_by_hand():
    """Prompt 10 11 12; chosen 13 14, rejected 15: the rejected branch starts with a copy of 12."""
    chosen = ([10, 11, 12, 13, 14], [X, X, X, 13, 14], 0)
    rejected = ([10, 11, 12, 15], [X, X, X, 15], 1)
    forest = check([chosen, rejected])
    assert forest.input_ids == [10, 11, 12, 13, 14, 12, 15]
    assert forest.positions == [0, 1, 2, 3, 4, 2, 3]
    assert [(c.start, c.end, c.context) for c in forest.chains] == [(0, 5, ()), (5, 7, ((0, 2),))]
    assert sorted(forest.score) == [(3, 0), (4, 0), (6, 1)]


def test_shared_trajectories_and_duplicates_are_computed_once():
    prompt = [1, 2, 3]
    a, b, c = prompt + [4, 5], prompt + [6, 7], prompt + [4, 5, 8]  # c extends a
    sequences = [(a, [X, X, X, 4, 5], 0), (b, [X, X, X, 6, 7], 1), (a, [X, X, X, 4, 5], 2), (c, [X, X, X, 4, 5, 8], 3)]
    forest = check(sequences)
    # sorted: a, a, c, b. The prompt and 4 5 once; c adds 8 after them; b a copy of 3, then 6 7.
    assert forest.input_ids == [1, 2, 3, 4, 5, 8, 3, 6, 7] and forest.positions == [0, 1, 2, 3, 4, 5, 2, 3, 4]
    depth3 = sorted((at, owner) for at, owner in forest.score if forest.positions[at] == 3)
    assert depth3 == [(3, 0), (3, 2), (3, 3), (7, 1)]  # token 4 computed once, scored for a, a and c


@pytest.mark.parametrize("seed", range(20))
def test_random_forests_score_every_token_in_its_own_context(seed):
    rng = random.Random(seed)
    vocab = [rng.randrange(50) for _ in range(4)]
    roots = [[rng.choice(vocab) for _ in range(rng.randrange(1, 6))] for _ in range(2)]
    sequences = []
    for owner in range(rng.randrange(1, 9)):
        ids = list(rng.choice(roots))
        for _ in range(rng.randrange(0, 3)):  # branch and extend
            ids = ids[: rng.randrange(1, len(ids) + 1)] + [rng.choice(vocab) for _ in range(rng.randrange(1, 5))]
        labels = [t if rng.random() < 0.6 else X for t in ids]
        sequences.append((ids, labels, owner))
    sequences += rng.sample(sequences, k=min(2, len(sequences)))  # duplicates, with their owners' labels
    sequences = [(ids, labels, k) for k, (ids, labels, _) in enumerate(sequences)]
    forest = check(sequences)
    assert len(forest) <= sum(len(ids) for ids, _, _ in sequences)
    assert forest_tokens([ids for ids, _, _ in sequences]) == len(forest)  # what `mtdpo stats` counts


# ── a model on forests of real pairs ─────────────────────────────────────────


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("forest"), n=12)


def records(cache, indices) -> list[PairRecord]:
    from mtdpo.cache import open_cache

    opened = open_cache(cache)
    return [opened.record(i) for i in indices]


def group_of_pairs(cache) -> list[PairRecord]:
    """Pairs of one problem built as `mtdpo pairs --rule all` builds them: 2 correct x 2 wrong
    trajectories answering one prompt, each trajectory in two pairs; plus a pair of another
    prompt whose sides are two sequences, one of them with trained tokens inside the prompt."""
    a, b, c = records(cache, [0, 1, 2])
    good = [a.chosen, Sequence(a.chosen.input_ids[:-2] + [7, 8], a.chosen.labels[:-2] + [7, 8])]
    bad = [a.rejected, Sequence(a.rejected.input_ids[:-1] + [9], a.rejected.labels[:-1] + [9])]
    pairs = [PairRecord(g, r, a.prompt_len, 0) for g in good for r in bad]
    two = Sequence.join([b.chosen, c.chosen])  # a side of two sequences
    labels = list(b.rejected.labels)
    labels[b.prompt_len - 2 : b.prompt_len] = b.rejected.input_ids[b.prompt_len - 2 : b.prompt_len]
    pairs.append(PairRecord(two, Sequence(b.rejected.input_ids, labels), b.prompt_len, 1))
    return pairs


def test_the_forest_gives_the_padded_log_probs(cache):
    pairs = group_of_pairs(cache)
    model = tiny_model()
    model.set_attn_implementation(SEGMENT_ATTENTION)
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)
    with torch.no_grad():
        padded, padded_tokens = fused_sequence_logps(model, PairCollator(0, segments=True)(pairs))
        forest_batch = PairCollator(0, prefix_forest=True)(pairs)
        forest, forest_tokens = fused_sequence_logps(model, forest_batch)
    torch.testing.assert_close(forest, padded, rtol=1e-5, atol=1e-4)
    assert forest_tokens.tolist() == padded_tokens.tolist()
    everything = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    assert forest_batch["input_ids"].shape[1] < everything / 2  # the shared prompt and trajectories once


def test_the_forest_gives_the_padded_losses_and_gradients(cache, tmp_path):
    pairs = group_of_pairs(cache)
    results = []
    for options in ({"segments": True}, {"prefix_forest": True}):
        model = tiny_model()
        model.set_attn_implementation(SEGMENT_ATTENTION)
        ref = tiny_model(seed=1)
        ref.set_attn_implementation(SEGMENT_ATTENTION)
        trainer = mtdpo_trainer(cache, model, ref, tmp_path, bf16=False)
        results.append(loss_metrics_grads(trainer, PairCollator(0, **options)(pairs)))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    assert metrics_b["rewards/margins"] == pytest.approx(metrics_a["rewards/margins"], abs=1e-4)
    assert max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b)) < 1e-5
