"""The DPO + NLL objective as pure tensor functions (no model, no trainer).

    loss = mean(dpo_loss(policy, reference, beta)) + nll_coef * NLL(chosen)

NLL is the mean cross-entropy over every trained chosen token of the optimizer step (the trainer
passes the count of all its micro-batches and ranks), as in the
original multi-turn recipe (and TRL's "sft" loss term), or with `--nll-norm sequence` the
mean over chosen sequences of each one's per-token NLL. Log-probs are summed over the
tokens whose label is not -100, so user turns, tool output and headers never count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl.trainer.utils import selective_log_softmax

from mtdpo.cache import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo", "apo_zero", "bco_pair")
REFERENCE_FREE = ("simpo",)  # these never look at a reference model: none is loaded, no reference forward runs
PER_TOKEN = ("ipo", "sigmoid_norm", "simpo")  # these need the trained token count of each sequence
NLL_NORMS = ("token", "sequence")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the trained tokens of each sequence, and how many there are.

    logits [B, T, V] at position t predict labels[:, t + 1]. This is the definition; the
    trainer computes the same numbers without materialising logits (fused_sequence_logps).
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    dtype = torch.promote_types(logits.dtype, torch.float32)  # sums in fp32 even for bf16 logits
    per_token = torch.zeros(trained.shape, dtype=dtype, device=logits.device)
    if trained.any():
        per_token[trained] = selective_log_softmax(logits[:, :-1][trained], targets[trained]).to(dtype)
    return per_token.sum(-1), trained.sum(-1)


def logistic_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log sigmoid(logits); label_smoothing = the assumed probability that the pair is flipped
    (conservative DPO, Mitchell 2023)."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and the implicit rewards (for logging).

    All inputs are [B] summed log-probs of the trained tokens; the reference is None for the
    reference-free losses (REFERENCE_FREE). The losses in PER_TOKEN divide by the trained
    token counts. Rewards are beta * (log pi - log pi_ref) (TRL's convention), for SimPO
    beta * the mean token log-prob, the reward it optimises.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if loss_type in PER_TOKEN and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"{loss_type} needs the trained token counts of each sequence")
    if loss_type == "simpo":
        # SimPO (Meng, Xia, Chen 2024, arXiv 2405.14734): the reward is beta * the mean
        # token log-prob of the policy alone, and the chosen must win by a margin gamma.
        chosen_reward = beta * policy_chosen / chosen_tokens.clamp(min=1)
        rejected_reward = beta * policy_rejected / rejected_tokens.clamp(min=1)
        losses = logistic_loss(chosen_reward - rejected_reward - simpo_gamma, label_smoothing)
        return losses, chosen_reward.detach(), rejected_reward.detach()
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"{loss_type} needs reference log-probs")

    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":  # DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7); label_smoothing = cDPO
        losses = logistic_loss(beta * delta, label_smoothing)
    elif loss_type == "robust":  # unbiased under label noise (Chowdhury et al. 2024, arXiv 2403.00409)
        if not 0 <= label_smoothing < 0.5:
            raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
        losses = (
            -F.logsigmoid(beta * delta) * (1 - label_smoothing) + F.logsigmoid(-beta * delta) * label_smoothing
        ) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":  # SLiC (Zhao et al. 2023, arXiv 2305.10425)
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17), log-ratios averaged per token as TRL does
        # (confirmed with the IPO authors).
        per_token_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "sigmoid_norm":
        # Length-normalised DPO: DPO on per-token log-ratios (TRL "sigmoid_norm", open-instruct
        # "dpo_norm"; Tulu 3, Lambert et al. 2024, arXiv 2411.15124), so long answers
        # do not win by length alone.
        per_token_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = logistic_loss(beta * per_token_delta, label_smoothing)
    elif loss_type == "apo_zero":
        # APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7): push the chosen
        # likelihood up and the rejected down, each anchored to the reference on its own.
        losses = (1 - torch.sigmoid(beta * chosen_ratio)) + torch.sigmoid(beta * rejected_ratio)
    else:  # bco_pair
        # BCO on pairs (Jung et al. 2024, arXiv 2404.04656): a binary classifier with
        # chosen = 1, rejected = 0 on the implicit rewards. TRL 1.16's form: no reward shift delta.
        losses = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def nll_loss(
    chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor, total_tokens: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Mean negative log-likelihood per trained chosen token (`--nll-norm token`, the default).

    `total_tokens` is the count to divide by when it differs from this batch's (e.g. all
    ranks' tokens, so that data-parallel ranks together average over the global batch).
    """
    total = chosen_tokens.sum() if total_tokens is None else total_tokens
    if int(total) == 0:
        raise ValueError("no trained chosen token in the batch: NLL is undefined (check the cache's labels)")
    return -chosen_logps.sum() / total


def sequence_nll_loss(
    chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor, total_pairs: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Mean over chosen sequences of each one's per-token NLL (`--nll-norm sequence`): every
    conversation weighs the same, however many tokens it trains. `total_pairs` is the count to
    divide by when it differs from this batch's (all micro-batches and ranks of a step)."""
    if int((chosen_tokens > 0).sum()) == 0:
        raise ValueError("no trained chosen token in the batch: NLL is undefined (check the cache's labels)")
    total = len(chosen_logps) if total_pairs is None else total_pairs
    return -(chosen_logps / chosen_tokens.clamp(min=1)).sum() / total
