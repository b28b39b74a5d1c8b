"""The DPO + NLL objective as pure tensor functions (no model, no trainer).

    loss = mean(dpo_loss(policy, reference, beta)) + nll_coef * NLL(chosen)

NLL is the mean cross-entropy over every trained chosen token of the batch, as in the
original multi-turn recipe (and TRL's "sft" loss term). Log-probs are summed over the
tokens whose label is not -100, so user turns, tool output and headers never count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl.trainer.utils import selective_log_softmax

IGNORE_INDEX = -100
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


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


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards beta * (log pi - log pi_ref).

    All inputs are [B] summed log-probs. `ipo` averages the log-ratios per token (as TRL
    does, confirmed with the IPO authors), so it needs the trained token counts.
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":  # label_smoothing = conservative DPO (cDPO)
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "robust":  # unbiased under label noise (Chowdhury et al. 2024)
        if not 0 <= label_smoothing < 0.5:
            raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
        losses = (-F.logsigmoid(beta * delta) * (1 - label_smoothing) + F.logsigmoid(-beta * delta) * label_smoothing) / (
            1 - 2 * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the trained token counts of each sequence")
        per_token_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def nll_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor, total_tokens: torch.Tensor | int | None = None) -> torch.Tensor:
    """Mean negative log-likelihood per trained chosen token.

    `total_tokens` is the count to divide by when it differs from this batch's (e.g. all
    ranks' tokens, so that data-parallel ranks together average over the global batch).
    """
    total = chosen_tokens.sum() if total_tokens is None else total_tokens
    if int(total) == 0:
        raise ValueError("no trained chosen token in the batch: NLL is undefined (check the cache's labels)")
    return -chosen_logps.sum() / total
