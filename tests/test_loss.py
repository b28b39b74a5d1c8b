"""The loss functions against numbers worked out by hand."""

import math

import pytest
import torch

from mtdpo.train.loss import dpo_loss, nll_loss, sequence_logps

# policy chosen/rejected -10/-12, reference -11/-11: log-ratios +1 and -1, delta 2, beta*delta 0.2
PAIR = dict(
    policy_chosen=torch.tensor([-10.0]),
    policy_rejected=torch.tensor([-12.0]),
    ref_chosen=torch.tensor([-11.0]),
    ref_rejected=torch.tensor([-11.0]),
    beta=0.1,
)
SOFTPLUS_MINUS = math.log(1 + math.exp(-0.2))  # -logsigmoid(0.2) = 0.598138869
SOFTPLUS_PLUS = math.log(1 + math.exp(0.2))  # -logsigmoid(-0.2) = 0.798138869


@pytest.mark.parametrize(
    "loss_type, smoothing, expected",
    [
        ("sigmoid", 0.0, 0.598138869),
        ("sigmoid", 0.1, 0.9 * SOFTPLUS_MINUS + 0.1 * SOFTPLUS_PLUS),  # 0.618138869
        ("robust", 0.1, (0.9 * SOFTPLUS_MINUS - 0.1 * SOFTPLUS_PLUS) / 0.8),  # 0.573138869
        ("robust", 0.0, 0.598138869),
        ("hinge", 0.0, 0.8),  # relu(1 - 0.2)
    ],
)
def test_dpo_loss_types(loss_type, smoothing, expected):
    losses, chosen_rewards, rejected_rewards = dpo_loss(**PAIR, loss_type=loss_type, label_smoothing=smoothing)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(0.1)
    assert rejected_rewards.item() == pytest.approx(-0.1)


def test_ipo_averages_log_ratios_per_token():
    # per-token delta = 1/4 - (-1/2) = 0.75; target 1/(2*0.1) = 5; (0.75 - 5)^2 = 18.0625
    losses, _, _ = dpo_loss(**PAIR, loss_type="ipo", chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([2]))
    assert losses.item() == pytest.approx(18.0625)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(**PAIR, loss_type="ipo")


def test_unknown_loss_and_bad_smoothing_raise():
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(**PAIR, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(**PAIR, loss_type="robust", label_smoothing=0.5)


def test_dpo_loss_gradient_sign():
    chosen = torch.tensor([-10.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1)
    losses.sum().backward()
    # d/dx -logsigmoid(0.1 (x - c)) = -0.1 * sigmoid(-0.2)
    assert chosen.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)))


def test_sequence_logps_counts_only_trained_tokens():
    # vocab 3; position 0 logits [0, ln 2, 0] -> probs [1/4, 1/2, 1/4]; positions 1-2 uniform
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = math.log(2)
    labels = torch.tensor([[-100, 1, -100, 2]])  # targets [1, -100, 2]: trained at positions 0 and 2
    logps, counts = sequence_logps(logits, labels)
    assert counts.tolist() == [2]
    assert logps.item() == pytest.approx(math.log(0.5) + math.log(1 / 3))


def test_sequence_logps_ignores_masked_logits():
    logits = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, -100, 3, 1, -100, -100], [-100, 4, -100, -100, -100, -100]])
    before, _ = sequence_logps(logits, labels)
    changed = logits.clone()
    changed[0, 3:] += 100.0  # positions predicting masked labels 4, 5 (and index 5, predicting nothing)
    changed[1, 1:] -= 50.0
    after, _ = sequence_logps(changed, labels)
    assert torch.equal(before, after)


def test_sequence_logps_all_masked_is_zero_not_nan():
    logps, counts = sequence_logps(torch.randn(1, 3, 4), torch.full((1, 3), -100))
    assert logps.item() == 0.0 and counts.item() == 0


def test_nll_is_mean_over_tokens():
    logps, tokens = torch.tensor([-3.0, -5.0]), torch.tensor([2, 3])
    assert nll_loss(logps, tokens).item() == pytest.approx(8 / 5)
    assert nll_loss(logps, tokens, total_tokens=10).item() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no trained chosen token"):
        nll_loss(torch.tensor([0.0]), torch.tensor([0]))
