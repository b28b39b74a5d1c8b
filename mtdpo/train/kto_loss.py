"""Multi-turn KTO on unpaired trajectories, as pure tensor functions (no model, no trainer).

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv 2402.01306, Eq. 7) scores each trajectory on its own, against a reference point z0:

    r      = log pi(y|x) - log pi_ref(y|x)                     (summed over trained tokens)
    z0     = max(0, mean over mismatched (x, y') of log pi(y'|x) - log pi_ref(y'|x))
    loss_y = w_D * (1 - sigmoid(beta * (r - z0)))   if y is desirable
           = w_U * (1 - sigmoid(beta * (z0 - r)))   if y is undesirable
    loss   = mean over the micro-batch's rows of loss_y

exactly as TRL's KTOTrainer computes it (1.16, `_compute_loss`; tests/train compare the two). A row is
a whole trajectory: its log-prob sums every trained assistant turn, user turns and tool output
carry label -100 and never count. The reference point z0 is estimated from the same batch with
each prompt paired to another row's completion (`mismatched_pairs`), computed without gradient.

`apo_zero_unpaired` (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7 without the pairing)
needs no reference point. Optional NLL on the desirable rows reuses `loss.nll_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mtdpo.cache import IGNORE_INDEX
from mtdpo.train.loss import nll_loss

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
NEEDS_KL = ("kto",)  # loss types with a reference point: these need the mismatched KL batch

Row = tuple[Sequence[int], Sequence[int], int]  # (input_ids, labels, prompt_len)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weighted KTO losses and the implicit rewards beta * r (detached, for logging).

    All inputs are [B], in row order; `desirable` is a bool mask; `kl` is the reference point
    z0 (`kl_estimate`), a constant: no gradient flows through it (TRL detaches it too). Each
    row's loss is TRL's expression, operation for operation.
    """
    ratio = policy_logps - ref_logps
    kl = torch.as_tensor(kl, dtype=ratio.dtype, device=ratio.device).detach()
    # desirable: the value rises with r above z0; undesirable: with r below it (loss aversion
    # is in the weights, not the form)
    margin = torch.where(desirable, ratio - kl, kl - ratio)
    losses = 1 - torch.sigmoid(beta * margin)
    return _weighted(losses, desirable, desirable_weight, undesirable_weight), beta * ratio.detach()


def apo_zero_unpaired(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APO-zero on unpaired rows (TRL `loss_type="apo_zero_unpaired"`): push each desirable
    trajectory's likelihood above the reference's, each undesirable one below, with no reference
    point. Same returns as `kto_loss`."""
    ratio = policy_logps - ref_logps
    losses = torch.where(desirable, 1 - torch.sigmoid(beta * ratio), torch.sigmoid(beta * ratio))
    return _weighted(losses, desirable, desirable_weight, undesirable_weight), beta * ratio.detach()


def unpaired_loss(
    loss_type: str,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float | None,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kto_loss` or `apo_zero_unpaired` by name (KTO_LOSS_TYPES); `kl` is ignored by the latter."""
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown unpaired loss_type {loss_type!r}; use one of {', '.join(KTO_LOSS_TYPES)}")
    if loss_type == "apo_zero_unpaired":
        return apo_zero_unpaired(policy_logps, ref_logps, desirable, beta, desirable_weight, undesirable_weight)
    if kl is None:
        raise ValueError("kto needs the reference point kl (kl_estimate of the mismatched pairs)")
    return kto_loss(policy_logps, ref_logps, desirable, kl, beta, desirable_weight, undesirable_weight)


def _weighted(
    losses: torch.Tensor, desirable: torch.Tensor, desirable_weight: float, undesirable_weight: float
) -> torch.Tensor:
    # each group's losses times its own weight, the product TRL computes
    return torch.where(desirable, desirable_weight * losses, undesirable_weight * losses)


def kto_mean(losses: torch.Tensor, total_rows: torch.Tensor | int | None = None) -> torch.Tensor:
    """The batch loss from per-row weighted losses.

    None: TRL's reduction, `nanmean` over the micro-batch's rows. The divisor is the row count,
    not the sum of weights, so the weights scale the loss, and a batch with no desirable (or
    no undesirable) row is simply the mean of the rows it has. A row whose loss is nan is left
    out of sum and count alike (the trainer should check `isfinite` first if it wants to stop).
    `total_rows`: divide the sum by this instead (all micro-batches and ranks of a step).
    """
    if losses.numel() == 0:
        raise ValueError("no row in the batch: the KTO loss is undefined")
    if total_rows is None:
        return losses.nanmean()
    return losses.nansum() / total_rows


def kl_estimate(
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The reference point z0: mean of policy - reference log-probs of the mismatched
    sequences, detached, clamped at 0 (KTO, arXiv 2402.01306, Sec. 4.1; TRL's estimate).

    Over ranks TRL takes each rank's mean, gathers those means, averages them, and only then
    clamps: pass `gather` (e.g. `accelerator.gather_for_metrics`, which turns the 0-d mean into
    a [world] tensor) to do the same. Each rank weighs the same, whatever its row count.
    """
    kl = (policy_kl_logps - ref_kl_logps).mean().detach()
    if gather is not None:
        kl = gather(kl).mean()
    return kl.clamp(min=0)


def kl_partners(n: int, batch_size: int | None = None) -> list[int]:
    """partners[i]: the row whose completion row i's KL sequence borrows.

    TRL rotates completions by +1 inside each run of `batch_size` consecutive rows (its
    per-device batch): row i takes row i-1's completion, the run's first row its last row's,
    so the mismatched completions are the batch's own completions on other prompts. None: the
    n rows are one batch. A run of one row (the dataset's last, say) is paired with itself.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    size = batch_size or max(n, 1)
    partners: list[int] = []
    for start in range(0, n, size):
        end = min(start + size, n)
        partners += [end - 1, *range(start, end - 1)]
    return partners


def kl_partner(position: int, n: int, batch_size: int) -> int:
    """`kl_partners(n, batch_size)[position]` alone: the partner of the row at `position` of a
    dataset of n rows, a pure function of the two (what a trainer reading rows in any order uses)."""
    if not 0 <= position < n:
        raise IndexError(f"position {position} of {n} rows")
    start = position - position % batch_size
    return min(start + batch_size, n) - 1 if position == start else position - 1


def mismatched_sequence(row: Row, partner: Row, max_length: int | None = None) -> tuple[list[int], list[int], int]:
    """One KL sequence: `row`'s prompt followed by `partner`'s completion (see mismatched_pairs)."""
    (ids, _, prompt_len), (other_ids, other_labels, other_prompt_len) = row, partner
    kl_ids = [*ids[:prompt_len], *other_ids[other_prompt_len:]]
    kl_labels = [IGNORE_INDEX] * prompt_len + [*other_labels[other_prompt_len:]]
    if max_length is not None:
        kl_ids, kl_labels = kl_ids[:max_length], kl_labels[:max_length]
    return kl_ids, kl_labels, min(prompt_len, len(kl_ids))


def mismatched_pairs(
    rows: Sequence[Row], batch_size: int | None = None, max_length: int | None = None
) -> list[tuple[list[int], list[int], int]]:
    """The KL batch: for each row (input_ids, labels, prompt_len), its prompt followed by the
    completion of its partner (`kl_partners`), as (input_ids, labels, prompt_len) plain lists.

    prompt_len is the count of tokens before the row's first trained assistant turn. A
    multi-turn completion is everything from there on: every later turn, user and tool turns
    included, with the partner's own labels (-100 on what is not trained), so the mismatched
    log-prob sums exactly the tokens a row's own log-prob would. The prompt keeps -100
    everywhere. On single-turn rows this is TRL's KL dataset token for token. `max_length`
    keeps each sequence's first tokens, as TRL's collator truncates (the KL sequence can be
    longer than both of the rows it joins).
    """
    return [mismatched_sequence(row, rows[j], max_length) for row, j in zip(rows, kl_partners(len(rows), batch_size))]


def desirable_nll(
    policy_logps: torch.Tensor,
    tokens: torch.Tensor,
    desirable: torch.Tensor,
    total_tokens: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean NLL per trained token of the desirable rows (`loss.nll_loss` on them).

    A batch (or, with `total_tokens`, a step) with no desirable row is normal in KTO: its NLL
    is a zero that keeps the graph (every parameter still gets a gradient, as DDP needs).
    """
    chosen_tokens = tokens[desirable]
    total = chosen_tokens.sum() if total_tokens is None else total_tokens
    if int(total) == 0:
        return policy_logps.sum() * 0
    return nll_loss(policy_logps[desirable], chosen_tokens, total)


def weight_advice(
    n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> str | None:
    """A warning when the class weights do not offset the imbalance of the data, else None.

    The KTO paper (Eq. 8) recommends w_D * n_D / (w_U * n_U) in [1, 4/3]: the desirable side
    weighs as much as the undesirable one, or a little more. TRL (KTOTrainer._prepare_dataset)
    checks it on the train set, only when the counts differ, with bounds rounded to 2 decimals
    and 1.33 for 4/3, and advises moving EITHER weight into its range, not both. Same rule here.
    """
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    if n_d == n_u:
        return None
    desirable_range = (round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2))
    undesirable_range = (round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2))
    if (
        desirable_range[0] <= desirable_weight <= desirable_range[1]
        or undesirable_range[0] <= undesirable_weight <= undesirable_range[1]
    ):
        return None
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    return (
        f"{n_desirable} desirable and {n_undesirable} undesirable rows with desirable_weight {desirable_weight:g} and "
        f"undesirable_weight {undesirable_weight:g}: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) "
        f"= {ratio:.2f}, outside the [1, 4/3] the KTO paper recommends (Eq. 8). Set EITHER desirable_weight in "
        f"[{desirable_range[0]:g}, {desirable_range[1]:g}] OR undesirable_weight in [{undesirable_range[0]:g}, {undesirable_range[1]:g}], not both."
    )
