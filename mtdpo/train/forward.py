"""The policy's (or reference's) forward pass over a batch of any layout: the summed log-prob of
each sequence's trained tokens, through TRL's fused LM head (the [batch, seq, vocab] logits are
never materialised), summed in fp32.
"""

from __future__ import annotations

import torch

from mtdpo.cache import IGNORE_INDEX
from mtdpo.train.attention import SEGMENT_ATTENTION, KeptKeys


def fused_sequence_logps(
    model,
    inputs: dict,
    n_sequences: int | None = None,
    keep_keys: KeptKeys | None = None,
    earlier_keys: KeptKeys | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss.sequence_logps` computed through the fused head: the same numbers (tested),
    without the logits, summed in fp32. Works on every layout of `data.PairCollator`:
    padded [2B, T] rows, and packed or prefix-shared rows, whose `logp_index` says which
    predicted position counts for which sequence (`n_sequences` of them: by default the 2B
    sides of the batch's pairs; KTO's packed batches say theirs).

    Segment attention only: `keep_keys` collects each layer's keys and values, and a batch with
    `earlier_context` attends to those of `earlier_keys` first (attention.py, kto_data.py)."""
    segments = inputs.get("segments") if uses_segment_attention(model) else None
    reuse = {}
    if keep_keys is not None or "earlier_context" in inputs:
        if segments is None:
            raise ValueError("keys and values are kept and reused by segment attention only")
        reuse = {"keep_keys": keep_keys}
        if "earlier_context" in inputs:
            reuse.update(earlier_keys=earlier_keys, earlier_context=inputs["earlier_context"])
    # With segments, a mask of ones: transformers then builds no [T, T] mask (the segments say it
    # all). Other kernels get the batch's own mask, or none for a packed row (positions mark it).
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=torch.ones_like(inputs["input_ids"]) if segments is not None else inputs.get("attention_mask"),
        position_ids=inputs.get("position_ids"),
        labels=inputs["labels"],
        fused_lm_head=True,
        use_cache=False,
        # read by attention.segment_attention (a forest's rows differ in length: a list, not a tensor)
        **({} if segments is None else {"segments": segments if isinstance(segments, list) else segments.tolist()}),
        **reuse,
    )
    log_probs = out.log_probs.float()
    if "logp_index" not in inputs:
        logps, tokens = log_probs.sum(-1), (inputs["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
        if "sequence_side" in inputs:  # rows are sequences; a side of several sums its rows
            side, n = inputs["sequence_side"], 2 * len(inputs["rows"])
            logps, tokens = logps.new_zeros(n).index_add(0, side, logps), tokens.new_zeros(n).index_add(0, side, tokens)
        return logps, tokens
    position, sequence = inputs["logp_index"]
    n = 2 * len(inputs["rows"]) if n_sequences is None else n_sequences
    logps = log_probs.new_zeros(n).index_add(0, sequence, log_probs[0, position])
    return logps, torch.bincount(sequence, minlength=n)


def uses_segment_attention(model) -> bool:
    config = getattr(getattr(model, "module", model), "config", None)  # DDP / DeepSpeed wrap the model in .module
    return getattr(config, "_attn_implementation", None) == SEGMENT_ATTENTION


def real_tokens(inputs: dict) -> torch.Tensor:
    """Tokens of both sequences of every pair, padding not counted: the same in every layout
    (a prefix-shared batch processes fewer, as the prompt goes through the model once)."""
    if "pair_tokens" in inputs:
        return inputs["pair_tokens"]
    mask = inputs.get("attention_mask")
    return (
        mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
    )
