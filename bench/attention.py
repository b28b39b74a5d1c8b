"""Attention kernels for a prefix-shared pair on this CPU: forward + backward of one attention
call, process CPU time, 1 thread, bf16.

    python bench/attention.py [--prompt 500 --suffix 500]

- padded: chosen and rejected as two causal sequences (what a padded batch computes);
- segments: mtdpo's segment attention on the shared row (prompt + chosen causal, then the
  rejected branch over the prompt and itself);
- dense mask: sdpa on the shared row under its [T, T] boolean mask;
- flex_attention: torch's block-sparse kernel, if it can run backward on this device.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from mtdpo.train.attention import dense_segment_mask, segment_attention


def cpu_ms(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=500)
    parser.add_argument("--suffix", type=int, default=500, help="tokens of chosen and of rejected after the prompt")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    p, s, h, d = args.prompt, args.suffix, args.heads, args.head_dim
    dtype = torch.bfloat16
    module = torch.nn.Module()
    module.num_key_value_groups = 1

    def tensors(length):
        return [torch.randn(1, h, length, d, dtype=dtype, requires_grad=True) for _ in range(3)]

    side = tensors(p + s)
    length = p + 2 * s + 1  # the rejected branch re-reads the prompt's last token
    row = tensors(length)
    segments = [[0, 0, p + s, 0, 0], [0, p + s, length, 0, p - 1]]
    mask = dense_segment_mask(segments, 1, length)
    results = {
        "padded (2 causal sequences)": cpu_ms(
            lambda: [F.scaled_dot_product_attention(*side, is_causal=True).sum().backward() for _ in range(2)]
        ),
        "segments (shared row)": cpu_ms(
            lambda: segment_attention(module, *row, None, segments=segments)[0].sum().backward()
        ),
        "dense [T, T] mask (shared row)": cpu_ms(
            lambda: F.scaled_dot_product_attention(*row, attn_mask=mask).sum().backward()
        ),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block = create_block_mask(lambda b, hh, q, kv: mask[0, 0, q, kv], 1, None, length, length, device="cpu")
        results["flex_attention (shared row)"] = cpu_ms(lambda: flex_attention(*row, block_mask=block).sum().backward())
    except Exception as err:  # torch 2.13: "FlexAttention does not support backward on CPU"
        results["flex_attention (shared row)"] = f"not available: {str(err).splitlines()[0]}"
    print(
        json.dumps(
            {
                "prompt": p,
                "suffix": s,
                "heads": h,
                "head_dim": d,
                "dtype": "bfloat16",
                "torch": torch.__version__,
                "cpu_ms_forward_backward": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
