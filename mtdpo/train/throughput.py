"""Tokens/s and MFU (model FLOPs utilisation), counted as TRL counts them, so the figures
compare with TRL's and with published ones.

FLOPs per token are TRL's `compute_flops_per_token` (forward + backward = 3 x forward, the
attention term at the batch's mean sequence length; the reference forward is not counted).
Tokens are those of both sequences of every pair, in every layout: a prefix-shared batch
computes its prompts once, so its MFU counts the work an unshared batch would have done.
"""

from __future__ import annotations

import torch


def peak_flops(device: torch.device, bf16: bool) -> tuple[float | None, str]:
    """The device's dense peak FLOP/s at the training precision (None where it is not known), and a note."""
    from trl.trainer.utils import get_peak_flops

    dtype = "bfloat16" if bf16 else "float32"
    if device.type != "cuda":
        return None, f"MFU: not computed (no known peak FLOP/s for a {device.type.upper()} at {dtype})"
    name = torch.cuda.get_device_name(device)
    peak = get_peak_flops(name, dtype)
    if peak is None:
        return None, f"MFU: not computed (no known peak FLOP/s for {name} at {dtype})"
    return peak, f"MFU against {name}'s {dtype} peak of {peak / 1e12:,.0f} TFLOP/s"


def mfu_percent(
    model_config, tokens_per_second: float, mean_sequence_length: float, peak: float, world_size: int
) -> float:
    from trl.trainer.utils import compute_flops_per_token, compute_mfu

    flops = compute_flops_per_token(model_config.get_text_config(), max(int(mean_sequence_length), 1))
    return compute_mfu(flops, tokens_per_second, world_size, peak)
