"""The KTO functions against numbers worked out by hand, and against TRL's KTOTrainer."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import trl
from helpers import family_tokenizer, for_family, sample_rows
from kto_reference import as_trl_text, locals_at_return, single_turn_kto_rows, trl_kto_step, trl_kto_trainer
from trainkit import tiny_model

from mtdpo.preprocess.records import MaskOptions, RecordBuilder
from mtdpo.train.kto_loss import (
    apo_zero_unpaired,
    desirable_nll,
    kl_estimate,
    kl_partners,
    kto_loss,
    kto_mean,
    mismatched_pairs,
    unpaired_loss,
    weight_advice,
)
from mtdpo.train.loss import sequence_logps


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Three rows, beta 0.1, reference point kl 0.5. Log-ratios r = policy - ref:
#   row 0 desirable,   -10 - -12 = +2:  1 - sigmoid(0.1 * (2 - 0.5))    = 1 - sigmoid(0.15)  = 1 - 0.537429845 = 0.462570155
#   row 1 undesirable, -13 - -12 = -1:  1 - sigmoid(0.1 * (0.5 - -1))   = 1 - sigmoid(0.15)  = 0.462570155
#   row 2 undesirable, -11 - -12 = +1:  1 - sigmoid(0.1 * (0.5 - 1))    = 1 - sigmoid(-0.05) = 1 - 0.487502604 = 0.512497396
# rewards beta * r: 0.2, -0.1, 0.1; mean loss (0.462570155 * 2 + 0.512497396) / 3 = 0.479212569
POLICY, REF = torch.tensor([-10.0, -13.0, -11.0]), torch.tensor([-12.0, -12.0, -12.0])
DESIRABLE = torch.tensor([True, False, False])
KTO_BY_HAND = [0.462570155, 0.462570155, 0.512497396]


def test_kto_loss_by_hand():
    losses, rewards = kto_loss(POLICY, REF, DESIRABLE, torch.tensor(0.5), beta=0.1)
    assert losses.tolist() == pytest.approx(KTO_BY_HAND, abs=1e-7)
    assert rewards.tolist() == pytest.approx([0.2, -0.1, 0.1], abs=1e-7)
    assert kto_mean(losses).item() == pytest.approx(0.479212569, abs=1e-7)
    assert not rewards.requires_grad


def test_weights_scale_each_group_and_the_mean_divides_by_rows():
    # desirable_weight 2, undesirable_weight 0.25: 2 * 0.462570155 = 0.925140309,
    # 0.25 * 0.462570155 = 0.115642539, 0.25 * 0.512497396 = 0.128124349; sum 1.168907197.
    # TRL divides by the 3 rows (0.389635732), not by the weights' sum 2.5 (which would give 0.467562879)
    losses, rewards = kto_loss(POLICY, REF, DESIRABLE, 0.5, beta=0.1, desirable_weight=2.0, undesirable_weight=0.25)
    assert losses.tolist() == pytest.approx([0.925140309, 0.115642539, 0.128124349], abs=1e-7)
    assert kto_mean(losses).item() == pytest.approx(0.389635732, abs=1e-7)
    assert rewards.tolist() == pytest.approx([0.2, -0.1, 0.1], abs=1e-7)  # rewards are never weighted
    # the micro-batch's share of a step of 6 rows: the same sum over 6
    assert kto_mean(losses, total_rows=6).item() == pytest.approx(0.194817866, abs=1e-7)


def test_mean_leaves_nan_rows_out_as_trl_nanmean_does():
    losses = torch.tensor([0.4, float("nan"), 0.6])
    assert kto_mean(losses).item() == pytest.approx(0.5)  # (0.4 + 0.6) / 2
    assert kto_mean(losses, total_rows=4).item() == pytest.approx(0.25)  # 1.0 / 4


def test_apo_zero_unpaired_by_hand():
    # row 0 desirable: 1 - sigmoid(0.1 * 2) = 1 - 0.549833997 = 0.450166003
    # row 1 undesirable: sigmoid(0.1 * -1) = 0.475020813; row 2 undesirable: sigmoid(0.1 * 1) = 0.524979187
    losses, rewards = apo_zero_unpaired(POLICY, REF, DESIRABLE, beta=0.1)
    assert losses.tolist() == pytest.approx([0.450166003, 0.475020813, 0.524979187], abs=1e-7)
    assert rewards.tolist() == pytest.approx([0.2, -0.1, 0.1], abs=1e-7)
    # no reference point: unpaired_loss ignores any kl given
    same, _ = unpaired_loss("apo_zero_unpaired", POLICY, REF, DESIRABLE, torch.tensor(3.0), 0.1)
    assert torch.equal(same, losses)


def test_unpaired_loss_dispatch_and_errors():
    losses, _ = unpaired_loss("kto", POLICY, REF, DESIRABLE, torch.tensor(0.5), 0.1)
    assert losses.tolist() == pytest.approx(KTO_BY_HAND, abs=1e-7)
    with pytest.raises(ValueError, match="needs the reference point"):
        unpaired_loss("kto", POLICY, REF, DESIRABLE, None, 0.1)
    with pytest.raises(ValueError, match="unknown unpaired loss_type"):
        unpaired_loss("sigmoid", POLICY, REF, DESIRABLE, 0.5, 0.1)
    with pytest.raises(ValueError, match="no row"):
        kto_mean(torch.tensor([]))


@pytest.mark.parametrize(
    "desirable, expected",
    [
        # all desirable: rows 1 and 2 now use the desirable form
        #   row 1: 1 - sigmoid(0.1 * (-1 - 0.5)) = 1 - sigmoid(-0.15) = 0.537429845
        #   row 2: 1 - sigmoid(0.1 * (1 - 0.5))  = 1 - sigmoid(0.05)  = 0.487502604
        ([True, True, True], [0.462570155, 0.537429845, 0.487502604]),
        # all undesirable: row 0: 1 - sigmoid(0.1 * (0.5 - 2)) = 1 - sigmoid(-0.15) = 0.537429845
        ([False, False, False], [0.537429845, 0.462570155, 0.512497396]),
    ],
)
def test_one_sided_batches_are_the_mean_of_the_rows_they_have(desirable, expected):
    losses, _ = kto_loss(POLICY, REF, torch.tensor(desirable), 0.5, beta=0.1)
    assert losses.tolist() == pytest.approx(expected, abs=1e-7)
    assert kto_mean(losses).item() == pytest.approx(sum(expected) / 3, abs=1e-7)


def test_single_row():
    losses, rewards = kto_loss(POLICY[:1], REF[:1], DESIRABLE[:1], 0.5, beta=0.1)
    assert kto_mean(losses).item() == pytest.approx(0.462570155, abs=1e-7)
    assert rewards.tolist() == pytest.approx([0.2])


def test_gradient_signs_and_kl_is_a_constant():
    # d/dx [1 - sigmoid(0.1 (x - c))] = -0.1 s (1 - s), s = sigmoid(0.15) for row 0;
    # undesirable row 1: d/dx [1 - sigmoid(0.1 (c - x))] = +0.1 s (1 - s), s = sigmoid(0.15)
    policy = POLICY.clone().requires_grad_(True)
    kl = torch.tensor(0.5, requires_grad=True)
    losses, _ = kto_loss(policy, REF, DESIRABLE, kl, beta=0.1)
    losses.sum().backward()
    s15, s05 = sigmoid(0.15), sigmoid(-0.05)
    assert policy.grad.tolist() == pytest.approx(
        [-0.1 * s15 * (1 - s15), 0.1 * s15 * (1 - s15), 0.1 * s05 * (1 - s05)], abs=1e-8
    )
    assert kl.grad is None  # z0 is detached: no gradient through the reference point


def test_kl_estimate_by_hand():
    # diffs policy - ref: (-5 - -6, -6 - -6) = (1, 0): mean 0.5
    assert kl_estimate(torch.tensor([-5.0, -6.0]), torch.tensor([-6.0, -6.0])).item() == pytest.approx(0.5)
    # (1, -2): mean -0.5, clamped at 0
    assert kl_estimate(torch.tensor([-5.0, -8.0]), torch.tensor([-6.0, -6.0])).item() == 0.0
    policy = torch.tensor([-5.0, -6.0], requires_grad=True)
    assert not kl_estimate(policy, torch.tensor([-6.0, -6.0])).requires_grad


def test_kl_over_ranks_averages_rank_means_then_clamps():
    # this rank's mean 0.3 ((0.5 + 0.1) / 2); the other rank's -0.5: mean of means -0.1 -> 0.
    # Clamping each rank first would give (0.3 + 0) / 2 = 0.15: the order matters.
    other = torch.tensor(-0.5)

    def gather(kl):
        return torch.stack([kl, other])  # what gather_for_metrics returns for a 0-d tensor

    policy, ref = torch.tensor([-5.5, -5.9]), torch.tensor([-6.0, -6.0])
    assert kl_estimate(policy, ref).item() == pytest.approx(0.3)
    assert kl_estimate(policy, ref, gather).item() == 0.0
    # other rank 0.9: (0.3 + 0.9) / 2 = 0.6, each rank weighs the same whatever its row count
    assert kl_estimate(policy, ref, lambda kl: torch.stack([kl, torch.tensor(0.9)])).item() == pytest.approx(0.6)


def test_kl_clamped_at_zero_in_the_loss():
    # kl 0: row 0: 1 - sigmoid(0.2) = 0.450166003; row 1: 1 - sigmoid(0.1) = 0.475020813;
    # row 2: 1 - sigmoid(-0.1) = 0.524979187
    kl = kl_estimate(torch.tensor([-8.0]), torch.tensor([-6.0]))
    assert kl.item() == 0.0
    losses, _ = kto_loss(POLICY, REF, DESIRABLE, kl, beta=0.1)
    assert losses.tolist() == pytest.approx([0.450166003, 0.475020813, 0.524979187], abs=1e-7)


# ── the KL batch: each prompt with another row's completion ──────────────────────────────────


def test_kl_partners_rotate_by_one_within_each_batch():
    assert kl_partners(4) == [3, 0, 1, 2]
    assert kl_partners(5, 2) == [1, 0, 3, 2, 4]  # the last run of one row is paired with itself
    assert kl_partners(6, 3) == [2, 0, 1, 5, 3, 4]
    assert kl_partners(1) == [0] and kl_partners(0) == []
    with pytest.raises(ValueError, match="batch_size"):
        kl_partners(3, 0)


# Multi-turn rows (input_ids, labels, prompt_len): A has a user turn (id 12, untrained) between two assistant turns.
A = ([10, 11, 20, 21, 12, 22], [-100, -100, 20, 21, -100, 22], 2)
B = ([13, 23, 24], [-100, 23, 24], 1)
C = ([14, 15, 16, 25], [-100, -100, -100, 25], 3)


def test_mismatched_pairs_by_hand():
    # partners [2, 0, 1]: A's prompt + C's completion, B's prompt + A's (whole later conversation,
    # its user turn still -100), C's prompt + B's
    assert mismatched_pairs([A, B, C]) == [
        ([10, 11, 25], [-100, -100, 25], 2),
        ([13, 20, 21, 12, 22], [-100, 20, 21, -100, 22], 1),
        ([14, 15, 16, 23, 24], [-100, -100, -100, 23, 24], 3),
    ]
    # batches of 2: A and B swap completions, C alone keeps its own
    assert mismatched_pairs([A, B, C], batch_size=2) == [
        ([10, 11, 23, 24], [-100, -100, 23, 24], 2),
        ([13, 20, 21, 12, 22], [-100, 20, 21, -100, 22], 1),
        ([14, 15, 16, 25], [-100, -100, -100, 25], 3),
    ]
    # max_length keeps the first tokens, as TRL's collator truncates
    assert mismatched_pairs([A, B], max_length=4) == [
        ([10, 11, 23, 24], [-100, -100, 23, 24], 2),
        ([13, 20, 21, 12], [-100, 20, 21, -100], 1),
    ]
    assert mismatched_pairs([B], max_length=1) == [([13], [-100], 1)]


def test_each_mismatched_sequence_trains_exactly_its_partners_tokens():
    # the KL log-prob of row i sums the same tokens as row j's own log-prob would
    rows = [A, B, C]
    for (_ids, labels, prompt_len), j in zip(mismatched_pairs(rows), kl_partners(3)):
        trained = [t for t in labels if t != -100]
        assert trained == [t for t in rows[j][1] if t != -100]
        assert all(t == -100 for t in labels[:prompt_len])


def first_assistant(messages: list[dict]) -> int:
    return next(i for i, m in enumerate(messages) if m["role"] == "assistant")


# Prefix-stable families: their trajectories are one sequence (Qwen3 scores a turn whose <think> the
# history drops in a sequence of its own, which a KL pairing in token space does not cover yet).
@pytest.mark.parametrize("family", ["gemma", "gemma3", "llama3", "qwen2", "mistral", "phi3", "deepseek3"])
def test_token_space_pairs_equal_the_masked_render_of_the_mismatched_conversation(family):
    """On real multi-turn trajectories (tool output between assistant turns), row i's KL sequence built
    in token space is exactly what masking the conversation (i's prompt messages + j's later
    turns) gives: the trainer needs no tokenizer to build it, on these prefix-stable templates."""
    tok = family_tokenizer(family)
    builder = RecordBuilder(tok, MaskOptions())
    conversations = [for_family(r, family)["chosen"] for r in sample_rows(4)]
    rows = []
    for messages in conversations:
        encoded = builder.mask_side(messages, first_assistant(messages))
        rows.append((encoded.input_ids, encoded.labels, next(i for i, t in enumerate(encoded.labels) if t != -100)))
    later = conversations[0][first_assistant(conversations[0]) :]
    assert any(m["role"] != "assistant" for m in later)  # an untrained turn (tool output) inside the completion
    for i, ((ids, labels, prompt_len), j) in enumerate(zip(mismatched_pairs(rows), kl_partners(4))):
        mixed = (
            conversations[i][: first_assistant(conversations[i])]
            + conversations[j][first_assistant(conversations[j]) :]
        )
        expected = builder.mask_side(mixed, first_assistant(mixed))
        assert (ids, labels) == (expected.input_ids, expected.labels)
        assert prompt_len == rows[i][2]


# ── NLL on the desirable rows, and TRL's advice on the class weights ─────────────────────────


def test_desirable_nll_by_hand():
    logps, tokens = torch.tensor([-3.0, -5.0, -7.0]), torch.tensor([2, 3, 4])
    desirable = torch.tensor([True, False, True])
    # (3 + 7) / (2 + 4) = 1.666667; with the step's 10 desirable tokens: 10 / 10 = 1
    assert desirable_nll(logps, tokens, desirable).item() == pytest.approx(10 / 6)
    assert desirable_nll(logps, tokens, desirable, total_tokens=10).item() == pytest.approx(1.0)


def test_desirable_nll_without_desirable_rows_is_a_connected_zero():
    logps = torch.tensor([-3.0, -5.0], requires_grad=True)
    nll = desirable_nll(logps, torch.tensor([2, 3]), torch.tensor([False, False]))
    assert nll.item() == 0.0
    nll.backward()
    assert logps.grad.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "counts, weights, warns",
    [
        ((100, 100), (1.0, 1.0), False),  # balanced: no advice, whatever the weights
        ((100, 100), (5.0, 1.0), False),
        # 1 desirable for 10 undesirable: w_D * 1 / (w_U * 10) = 0.1, far below [1, 4/3]
        ((10, 100), (1.0, 1.0), True),
        # w_D in [100 * 1 / 10, 1.33 * 10] = [10, 13.3]: 12 fits
        ((10, 100), (12.0, 1.0), False),
        # or w_U in [10 * 1 / 100 / 1.33, 10 / 100] = [0.08, 0.1]: 0.09 fits
        ((10, 100), (1.0, 0.09), False),
        # more desirable than undesirable: 3:1 with weights 1 -> ratio 3 > 4/3
        ((300, 100), (1.0, 1.0), True),
        # w_U in [300 / 100 / 1.33, 3] = [2.26, 3]: 2.5 fits (ratio 1.2)
        ((300, 100), (1.0, 2.5), False),
    ],
)
def test_weight_advice(counts, weights, warns):
    advice = weight_advice(*counts, *weights)
    assert (advice is not None) == warns
    if warns:
        assert "EITHER desirable_weight in" in advice


def test_weight_advice_text_gives_trl_ranges():
    # 10 desirable, 100 undesirable: desirable_weight in [10, 13.3], undesirable_weight in [0.08, 0.1]
    advice = weight_advice(10, 100)
    assert "= 0.10" in advice and "[10, 13.3]" in advice and "[0.08, 0.1]" in advice


# ── parity with TRL's KTOTrainer: its own _compute_loss, fed the log-probs we choose ────────
# A stand-in model returns given per-token log-probs (as TRL's fused LM head would), one tensor
# for the batch and one for its mismatched KL batch (told apart by their token ids), so both
# sides compute their loss from identical numbers: what is compared is the formula, to 1e-6.
ROWS, WIDTH = 6, 10  # rows per batch, sequence length
MAIN, KL = 1, 2  # the token ids filling each batch


class GivenLogProbs(torch.nn.Module):
    def __init__(self, per_token, kl_per_token):
        super().__init__()
        self.per_token, self.kl_per_token = per_token, kl_per_token

    def forward(self, input_ids, **_):
        per_token = self.kl_per_token if input_ids[0, 0].item() == KL else self.per_token
        zeros = torch.zeros_like(per_token.detach())
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    model = tiny_model(seed=0)
    return trl_kto_trainer(
        as_trl_text(single_turn_kto_rows(ROWS)), model, model, tmp_path_factory.mktemp("trl-kto"), batch_size=ROWS
    )


@pytest.fixture(scope="module")
def logprobs():
    """Multi-turn-shaped trained masks (gaps inside the completion), per-token and reference log-probs."""
    g = torch.Generator().manual_seed(11)

    def draw(shift):
        trained = torch.rand(ROWS, WIDTH - 1, generator=g) < 0.6
        trained[:, :2] = False  # a prompt
        trained[:, 2] = True  # at least one trained token per sequence
        per_token = -3 * torch.rand(ROWS, WIDTH - 1, generator=g) * trained
        return trained, per_token, per_token.sum(1) - shift + 0.7 * torch.randn(ROWS, generator=g)

    # the rows, and their mismatched KL sequences (policy above the reference on average: kl > 0)
    return draw(0.0), draw(1.0)


def trl_inputs(rows, kl_rows, desirable):
    (trained, _, ref), (kl_trained, _, kl_ref) = rows, kl_rows

    def mask(t):
        return torch.cat([torch.zeros(ROWS, 1, dtype=torch.long), t.long()], 1)

    ones = torch.ones(ROWS, WIDTH, dtype=torch.long)
    return {"input_ids": MAIN * ones, "attention_mask": ones, "completion_mask": mask(trained),
            "KL_input_ids": KL * ones, "KL_attention_mask": ones, "KL_completion_mask": mask(kl_trained),
            "label": desirable, "ref_logps": ref, "ref_KL_logps": kl_ref}  # fmt: skip


LABELS = {
    "mixed": [True, False, False, True, False, True],
    "all desirable": [True] * ROWS,
    "all undesirable": [False] * ROWS,
}


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.75)])
@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_matches_trl_on_the_same_logprobs(trl_trainer, logprobs, loss_type, labels, weights):
    rows, kl_rows = logprobs
    desirable = torch.tensor(LABELS[labels])
    trl_trainer.loss_type, trl_trainer.calculate_KL = loss_type, loss_type == "kto"
    trl_trainer.desirable_weight, trl_trainer.undesirable_weight = weights
    trl_trainer.precompute_ref_logps = True

    theirs_leaf = rows[1].clone().requires_grad_(True)
    model = GivenLogProbs(theirs_leaf, kl_rows[1])
    theirs, frame = locals_at_return(
        trl.KTOTrainer._compute_loss, trl_trainer._compute_loss, model, trl_inputs(rows, kl_rows, desirable), False
    )
    theirs.backward()

    ours_leaf = rows[1].clone().requires_grad_(True)
    kl = kl_estimate(kl_rows[1].sum(1), kl_rows[2]) if loss_type == "kto" else None
    losses, rewards = unpaired_loss(loss_type, ours_leaf.sum(1), rows[2], desirable, kl, 0.1, *weights)
    ours = kto_mean(losses)
    ours.backward()

    assert abs(ours.item() - theirs.item()) < 1e-6
    assert (ours_leaf.grad - theirs_leaf.grad).abs().max().item() < 1e-6
    assert theirs_leaf.grad.abs().sum() > 0  # a real comparison
    # TRL concatenates desirable then undesirable rows; ours stay in row order
    assert torch.allclose(torch.cat([losses[desirable], losses[~desirable]]), frame["losses"], atol=1e-6, rtol=0)
    assert torch.allclose(rewards[desirable], frame["chosen_rewards"], atol=1e-6, rtol=0)
    assert torch.allclose(rewards[~desirable], frame["rejected_rewards"], atol=1e-6, rtol=0)
    if loss_type == "kto":
        assert abs(kl.item() - frame["kl"].item()) < 1e-6
        assert kl.item() > 0  # unclamped here: the mean itself is compared
    else:
        assert frame["kl"].item() == 0.0  # TRL logs 0: no KL batch, no reference point


def test_kl_over_ranks_matches_trl(trl_trainer, logprobs, monkeypatch):
    """TRL's mean over ranks, with a second rank faked into accelerate's gather: it averages the
    ranks' means and then clamps, as kl_estimate(gather=...) does."""
    rows, kl_rows = logprobs
    trl_trainer.loss_type, trl_trainer.calculate_KL, trl_trainer.precompute_ref_logps = "kto", True, True
    trl_trainer.desirable_weight = trl_trainer.undesirable_weight = 1.0
    for other in (-5.0, -0.2, 0.7):  # the other rank's mean: clamps the result, lowers it, raises it

        def gather(t, other=other):
            return torch.cat([t.reshape(-1), torch.full_like(t.reshape(-1), other)])

        monkeypatch.setattr(trl_trainer.accelerator, "gather_for_metrics", gather)
        model = GivenLogProbs(rows[1].clone(), kl_rows[1])
        _, frame = locals_at_return(
            trl.KTOTrainer._compute_loss,
            trl_trainer._compute_loss,
            model,
            trl_inputs(rows, kl_rows, torch.tensor(LABELS["mixed"])),
            False,
        )
        ours = kl_estimate(kl_rows[1].sum(1), kl_rows[2], gather)
        assert abs(ours.item() - frame["kl"].item()) < 1e-6


def test_kl_pairing_matches_trl_dataset(tmp_path):
    """TRL's KL dataset (its `KL_completion_ids`) is mismatched_pairs on its own tokenization:
    7 rows in batches of 3, the last batch a single row paired with itself."""
    rows = as_trl_text(single_turn_kto_rows(7))
    model = tiny_model(seed=0)
    trainer = trl_kto_trainer(rows, model, model, tmp_path, batch_size=3)
    ds = trainer.train_dataset
    ours = [
        (
            ex["prompt_ids"] + ex["completion_ids"],
            [-100] * len(ex["prompt_ids"]) + ex["completion_ids"],
            len(ex["prompt_ids"]),
        )
        for ex in ds
    ]
    for ex, (ids, labels, prompt_len) in zip(ds, mismatched_pairs(ours, batch_size=3)):
        assert ids == ex["prompt_ids"] + ex["KL_completion_ids"]
        assert labels == [-100] * len(ex["prompt_ids"]) + ex["KL_completion_ids"]
        assert prompt_len == len(ex["prompt_ids"])
    assert ds[6]["KL_completion_ids"] == ds[6]["completion_ids"]


@pytest.mark.parametrize(
    "labels, weights",
    [
        ([True] * 2 + [False] * 5, (1.0, 1.0)),
        ([True] * 2 + [False] * 5, (3.0, 1.0)),
        ([True] * 6 + [False], (1.0, 1.0)),
    ],
)
def test_weight_advice_matches_trl_warning(tmp_path, caplog, labels, weights):
    rows = [dict(r, label=label) for r, label in zip(as_trl_text(single_turn_kto_rows(7)), labels)]
    model = tiny_model(seed=0)
    with caplog.at_level("WARNING"):
        trl_kto_trainer(
            rows, model, model, tmp_path, batch_size=2, desirable_weight=weights[0], undesirable_weight=weights[1]
        )
    trl_warned = any("don't seem to be in an ideal range" in r.getMessage() for r in caplog.records)
    n_desirable = sum(labels)
    assert trl_warned == (weight_advice(n_desirable, len(labels) - n_desirable, *weights) is not None)


# ── the reference run: TRL's KTOTrainer on a real (tiny) model ───────────────────────────────


@pytest.mark.slow
def test_trl_reference_step_kl_is_kl_estimate_on_our_mismatched_pairs(tmp_path):
    """TRL's one step on 8 single-turn rows: finite numbers, and its KL reference point equals
    kl_estimate of the log-probs we compute ourselves on the KL batch mismatched_pairs builds
    from TRL's tokenization: the pairing rule and the estimate are TRL's."""
    policy = tiny_model(seed=0)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a noisier reference: its near-uniform distributions spread, so it gives
        g = torch.Generator().manual_seed(1)  # the completions lower log-probs and the KL mean is > 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    rows = as_trl_text(single_turn_kto_rows(8))
    step = trl_kto_step(rows, policy, reference, tmp_path, batch_size=4)

    assert math.isfinite(step.loss) and math.isfinite(step.kl)
    assert torch.isfinite(step.rewards).all() and torch.isfinite(step.grad).all() and step.grad.abs().sum() > 0
    assert step.desirable.tolist() == [True, False, True, False]

    ours = [
        (
            ex["prompt_ids"] + ex["completion_ids"],
            [-100] * len(ex["prompt_ids"]) + ex["completion_ids"],
            len(ex["prompt_ids"]),
        )
        for ex in step.examples
    ]
    kl_rows = mismatched_pairs(ours, batch_size=4)
    for ex, (ids, _, _) in zip(step.examples, kl_rows):
        assert ids == ex["prompt_ids"] + ex["KL_completion_ids"]
    policy_kl, ref_kl = padded_logps(policy, kl_rows), padded_logps(reference, kl_rows)
    assert torch.allclose(policy_kl, step.policy_kl_logps.float(), atol=1e-6, rtol=0)
    assert torch.allclose(ref_kl, step.ref_kl_logps.float(), atol=1e-6, rtol=0)
    kl = kl_estimate(policy_kl, ref_kl)
    assert kl.item() > 0  # the clamp did not hide the comparison
    assert abs(kl.item() - step.kl) < 1e-6
    assert step.metrics["kl"] == pytest.approx(step.kl)

    # and the loss and rewards from our own log-probs of the rows themselves
    policy_logps, ref_logps = padded_logps(policy, ours), padded_logps(reference, ours)
    losses, rewards = kto_loss(policy_logps, ref_logps, step.desirable, kl, beta=0.1)
    assert torch.allclose(rewards, step.rewards, atol=1e-6, rtol=0)
    assert abs(kto_mean(losses).item() - step.loss) < 1e-6


def padded_logps(model, rows) -> torch.Tensor:
    """Summed log-probs of the trained tokens of (input_ids, labels, _) rows, right-padded, with
    loss.sequence_logps on the model's logits (no fused head, no TRL)."""
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _, _ in rows])
    labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels, _ in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in rows])
    with torch.no_grad():
        logits = model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits
    return sequence_logps(logits, labels)[0]
