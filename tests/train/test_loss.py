"""The loss functions against numbers worked out by hand."""

import math

import pytest
import torch

from mtdpo.train.loss import LOSS_TYPES, NLL_NORMS, dpo_loss, nll_loss, sequence_logps, sequence_nll_loss

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


# ── the losses beyond sigmoid / ipo / hinge / robust, on PAIR (log-ratios +1 / -1, beta 0.1) ──
TOKENS = dict(chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([2]))


def softplus(x: float) -> float:  # -logsigmoid(-x)
    return math.log(1 + math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        # per-token log-ratios 1/4 and -1/2: -logsigmoid(0.1 * 0.75) = 0.656340
        ("sigmoid_norm", softplus(-0.075)),
        # 1 - sigmoid(0.1 * 1) + sigmoid(0.1 * -1) = 2 sigmoid(-0.1) = 0.950042
        ("apo_zero", 2 * sigmoid(-0.1)),
        # -logsigmoid(0.1 * 1) - logsigmoid(-0.1 * -1) = 2 softplus(-0.1) = 1.288793
        ("bco_pair", 2 * softplus(-0.1)),
    ],
)
def test_reference_losses_by_hand(loss_type, expected):
    losses, chosen_rewards, rejected_rewards = dpo_loss(**PAIR, loss_type=loss_type, **TOKENS)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert (chosen_rewards.item(), rejected_rewards.item()) == pytest.approx(
        (0.1, -0.1)
    )  # beta * log-ratio, as TRL logs


def test_sigmoid_norm_ignores_length():
    # the same per-token log-ratios from sequences 10x as long: the same loss (sigmoid would not)
    long = dict(
        policy_chosen=torch.tensor([-100.0]),
        policy_rejected=torch.tensor([-120.0]),
        ref_chosen=torch.tensor([-110.0]),
        ref_rejected=torch.tensor([-110.0]),
        beta=0.1,
    )
    short, _, _ = dpo_loss(**PAIR, loss_type="sigmoid_norm", **TOKENS)
    longer, _, _ = dpo_loss(
        **long, loss_type="sigmoid_norm", chosen_tokens=torch.tensor([40]), rejected_tokens=torch.tensor([20])
    )
    assert longer.item() == pytest.approx(short.item(), abs=1e-7)


@pytest.mark.parametrize("beta, gamma", [(0.1, 0.5), (2.0, 1.0)])
def test_simpo_by_hand_and_reference_free(beta, gamma):
    # rewards beta * mean token log-prob: beta * -10/4 and beta * -12/2; loss -logsigmoid(margin - gamma)
    chosen_reward, rejected_reward = beta * -2.5, beta * -6.0
    losses, c, r = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), None, None, beta, "simpo", simpo_gamma=gamma, **TOKENS
    )
    assert losses.item() == pytest.approx(softplus(-(chosen_reward - rejected_reward - gamma)), abs=1e-6)
    assert (c.item(), r.item()) == pytest.approx((chosen_reward, rejected_reward))
    with_ref, _, _ = dpo_loss(**{**PAIR, "beta": beta}, loss_type="simpo", simpo_gamma=gamma, **TOKENS)
    assert torch.equal(with_ref, losses)  # a reference, when given, is not looked at


def test_new_losses_refuse_missing_inputs():
    for loss_type in ("sigmoid_norm", "simpo"):
        with pytest.raises(ValueError, match="token counts"):
            dpo_loss(**PAIR, loss_type=loss_type)
    with pytest.raises(ValueError, match="reference log-probs"):
        dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), None, None, 0.1, "apo_zero")


def test_sequence_nll_is_mean_over_sequences_of_per_token_nll():
    logps, tokens = torch.tensor([-3.0, -5.0]), torch.tensor([2, 3])
    assert sequence_nll_loss(logps, tokens).item() == pytest.approx((3 / 2 + 5 / 3) / 2)  # 1.583333, vs 8/5 per token
    with pytest.raises(ValueError, match="no trained chosen token"):
        sequence_nll_loss(torch.tensor([0.0]), torch.tensor([0]))


# ── the multi-turn property: logits at positions whose next label is -100 never reach the loss ──
# Two conversations per side, trained spans separated by untrained (user / tool) spans.
LABELS = torch.tensor(
    [
        [-100, -100, 5, 6, -100, -100, -100, 2, 3, -100],  # chosen 0: two assistant turns
        [-100, 4, 4, -100, -100, 7, -100, -100, -100, -100],  # chosen 1
        [-100, -100, 1, -100, -100, -100, 6, 6, 6, -100],  # rejected 0
        [-100, 3, -100, -100, 2, 2, 2, 2, -100, -100],  # rejected 1
    ]
)


def objective_from_logits(policy_logits, ref_logits, loss_type, nll_norm):
    logps, tokens = sequence_logps(policy_logits, LABELS)
    ref_logps, _ = sequence_logps(ref_logits, LABELS)
    (c, r), (rc, rr), (ct, rt) = logps.chunk(2), ref_logps.chunk(2), tokens.chunk(2)
    losses, _, _ = dpo_loss(c, r, rc, rr, 0.1, loss_type, 0.1 if loss_type == "robust" else 0.0, ct, rt)
    nll = nll_loss(c, ct) if nll_norm == "token" else sequence_nll_loss(c, ct)
    return losses.mean() + nll


@pytest.mark.parametrize("nll_norm", NLL_NORMS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_untrained_positions_leave_every_loss_bit_identical(loss_type, nll_norm):
    g = torch.Generator().manual_seed(1)
    policy = torch.randn(4, 10, 8, generator=g, requires_grad=True)
    ref = torch.randn(4, 10, 8, generator=g)
    loss = objective_from_logits(policy, ref, loss_type, nll_norm)
    loss.backward()
    untrained = torch.cat(
        [LABELS[:, 1:] == -100, torch.ones(4, 1, dtype=torch.bool)], 1
    )  # the last position predicts nothing
    assert untrained.sum() > 20 and (~untrained).sum() > 10
    noise = 50 * torch.randn(4, 10, 8, generator=g) * untrained[..., None]
    with torch.no_grad():
        perturbed = objective_from_logits(policy + noise, ref - noise, loss_type, nll_norm)
    assert torch.equal(perturbed, loss.detach())
    assert torch.all(policy.grad[untrained] == 0) and policy.grad[~untrained].abs().sum() > 0
