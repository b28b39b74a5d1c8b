"""Segment attention: the exact attention pattern of padded, packed and prefix-shared batches,
as a few causal sdpa calls, without a dense [T, T] mask.

A batch says which queries see which keys through `segments`, rows of five ints
`(row, start, end, context_start, context_end)`: the queries `start:end` of batch row `row`
attend causally to themselves and fully to the keys `context_start:context_end` before them
(an empty context for an ordinary sequence). So

- a padded row is one segment over its real tokens (padding is never computed);
- a packed row holds one segment per sequence;
- a prefix-shared pair is prompt + chosen (one causal segment) followed by the rejected branch,
  whose context is the prompt (see `data.shared_pair`).

Each segment is one `scaled_dot_product_attention` call: causal (flash kernel) without a
context; with one, a [queries, context + queries] mask (never [T, T]). Registered as the attention
implementation "sdpa_segments"; a forward without `segments` (generation, a plain batch) is
transformers' sdpa, masks included, so the model stays an ordinary model.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SEGMENT_ATTENTION = "sdpa_segments"


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, segments=None, **kwargs):
    """query [B, H, T, D], key/value [B, H_kv, T, D] -> ([B, T, H, D], None), like transformers' sdpa."""
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError(f"attention {SEGMENT_ATTENTION!r} supports neither logit soft-capping nor sliding windows")
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])  # padding stays 0
    for row, start, end, context_start, context_end in segments:
        q = query[row : row + 1, :, start:end]
        if context_start == context_end:
            k, v, mask = key[row : row + 1, :, start:end], value[row : row + 1, :, start:end], None
        else:
            k = torch.cat([key[row : row + 1, :, context_start:context_end], key[row : row + 1, :, start:end]], dim=2)
            v = torch.cat(
                [value[row : row + 1, :, context_start:context_end], value[row : row + 1, :, start:end]], dim=2
            )
            context = (
                context_end - context_start
            )  # all of the context, then causal (a bool mask: autocast casts q, k, v alike)
            mask = torch.ones(end - start, k.shape[2], dtype=torch.bool, device=q.device).tril(context)
        attended, _ = sdpa_attention_forward(
            module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=mask is None
        )
        out[row, start:end] = attended[0]
    return out, None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)  # the masks sdpa gets, for forwards without segments


def dense_segment_mask(segments: list[list[int]], batch: int, length: int) -> torch.Tensor:
    """The [B, 1, T, T] boolean mask the segments stand for (True = attend): the definition,
    for tests; padding rows attend nowhere."""
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for row, start, end, context_start, context_end in segments:
        n = end - start
        mask[row, 0, start:end, start:end] = torch.ones(n, n, dtype=torch.bool).tril()
        mask[row, 0, start:end, context_start:context_end] = True
    return mask
