"""Segment attention: the exact attention pattern of padded, packed and prefix-shared batches,
as a few causal sdpa calls, without a dense [T, T] mask.

A batch says which queries see which keys through `segments`, rows of ints
`(row, start, end, context_start, context_end, ...)`: the queries `start:end` of batch row `row`
attend causally to themselves and fully to the keys of the context ranges before them (one
range, possibly empty, or several: a prefix forest's chain sees each of its ancestors). So

- a padded row is one segment over its real tokens (padding is never computed);
- a packed row holds one segment per sequence;
- a prefix-shared pair is prompt + chosen (one causal segment) followed by the rejected branch,
  whose context is the prompt (see `data.shared_pair`);
- a prefix forest holds one segment per chain, its context the chains of its path (`forest.py`).

Each segment is one `scaled_dot_product_attention` call: causal (flash kernel) without a
context; with one, a [queries, context + queries] mask (never [T, T]). Registered as the attention
implementation "sdpa_segments"; a forward without `segments` (generation, a plain batch) is
transformers' sdpa, masks included, so the model stays an ordinary model.

One forward can also keep its keys and values (`keep_keys`, a `KeptKeys`) for a later one whose
segments attend first to ranges of them (`earlier_keys`, with `earlier_context`: per segment,
`(row, start, end)` ranges of the kept forward's rows). KTO's KL sequences use it: each continues
its row's prompt, whose keys and values the rows' forward has already computed (kto_data.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SEGMENT_ATTENTION = "sdpa_segments"


@dataclass
class KeptKeys:
    """Each layer's keys and values of one forward, by layer index (detached: a later forward reads
    them without gradient)."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def segment_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    segments=None,
    keep_keys: KeptKeys | None = None,
    earlier_keys: KeptKeys | None = None,
    earlier_context: list[list[tuple[int, int, int]]] | None = None,
    **kwargs,
):
    """query [B, H, T, D], key/value [B, H_kv, T, D] -> ([B, T, H, D], None), like transformers' sdpa."""
    if keep_keys is not None:
        keep_keys.layers[module.layer_idx] = (key.detach(), value.detach())
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError(f"attention {SEGMENT_ATTENTION!r} supports neither logit soft-capping nor sliding windows")
    earlier = earlier_keys.layers[module.layer_idx] if earlier_context is not None else None
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])  # padding stays 0
    for index, (row, start, end, *bounds) in enumerate(segments):
        q = query[row : row + 1, :, start:end]
        # (tensors, row, start, end) of each context range, the kept forward's first, then its own
        ranges = [(earlier, *place) for place in earlier_context[index]] if earlier is not None else []
        ranges += [((key, value), row, a, b) for a, b in zip(bounds[::2], bounds[1::2]) if a < b]
        ranges.append(((key, value), row, start, end))
        if len(ranges) > 1:
            k = torch.cat([kv[0][r : r + 1, :, a:b] for kv, r, a, b in ranges], dim=2)
            v = torch.cat([kv[1][r : r + 1, :, a:b] for kv, r, a, b in ranges], dim=2)
        else:
            k, v = key[row : row + 1, :, start:end], value[row : row + 1, :, start:end]
        context = k.shape[2] - (end - start)
        mask = None  # no context: plain causal (the flash kernel)
        if context:  # all of the context, then causal (a bool mask: autocast casts q, k, v alike)
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
    for row, start, end, *bounds in segments:
        n = end - start
        mask[row, 0, start:end, start:end] = torch.ones(n, n, dtype=torch.bool).tril()
        for a, b in zip(bounds[::2], bounds[1::2]):
            mask[row, 0, start:end, a:b] = True
    return mask
