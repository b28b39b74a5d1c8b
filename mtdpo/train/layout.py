"""How a batch is laid out and which attention computes it: padded, padding-free (packed) or
prefix-shared (one sequence per pair, its prompt computed once), chosen once per run from the
requested attention kernel and the model (see data.py for the layouts, attention.py for the kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtdpo.errors import UsageError
from mtdpo.train.attention import SEGMENT_ATTENTION


def segments_fit(config) -> bool:
    """Whether segment attention computes this model's attention exactly: plain causal
    softmax attention, no logit soft-capping (Gemma-2) and no sliding window (Mistral, Gemma-2/3)."""
    text = config.get_text_config()
    return getattr(text, "attn_logit_softcapping", None) is None and getattr(text, "sliding_window", None) is None


@dataclass(frozen=True)
class Layout:
    """How batches are laid out and which attention computes them (see data.py, attention.py)."""

    attention: str  # the attn_implementation the models are loaded with
    prefix_sharing: bool
    padding_free: bool
    note: str  # printed once at start
    prefix_forest: bool = False  # every distinct prefix of the micro-batch computed once (forest.py)

    def collator_options(self) -> dict:
        """Keyword arguments of data.PairCollator for this layout."""
        return {
            "padding_free": self.padding_free,
            "prefix_sharing": self.prefix_sharing,
            "prefix_forest": self.prefix_forest,
            "segments": self.attention == SEGMENT_ATTENTION,
        }


def choose_layout(
    requested_attention: str, prefix_sharing: bool | None, padding_free: bool, model_config, prefix_forest: bool = False
) -> Layout:
    """sdpa (the default) becomes segment attention where it is exact: padding is then never
    computed, packed and prefix-shared rows need no [T, T] mask, and prefix sharing is on unless
    turned off. flash_attention_2 packs through its variable-length kernel; eager (or a model
    segment attention does not fit) cannot pack without a dense mask, so it gets padded batches."""
    segments = requested_attention == "sdpa" and segments_fit(model_config)
    if prefix_forest:
        if not segments:
            raise UsageError(
                "--prefix-forest needs segment attention (sdpa on a plain causal model, no soft-capping or sliding window)"
            )
        note = "prefix forest: every prefix the micro-batch's sequences share computed once (--prefix-forest)"
        return Layout(SEGMENT_ATTENTION, False, False, note, prefix_forest=True)
    if prefix_sharing and not segments:
        why = (
            "this model's attention (soft-capping or sliding window)"
            if requested_attention == "sdpa"
            else f"--attn-implementation {requested_attention}"
        )
        raise UsageError(
            f"--prefix-sharing needs segment attention (sdpa on a plain causal model), not {why}; pass --no-prefix-sharing"
        )
    share = segments if prefix_sharing is None else prefix_sharing
    pack = padding_free and not share  # a prefix-shared row is already packed
    attention = SEGMENT_ATTENTION if segments else requested_attention
    if share:
        note = "prefix sharing: each pair is one sequence, its prompt computed once (--no-prefix-sharing turns it off)"
    elif pack and segments:
        note = "padding-free batches (segment attention)"
    elif pack and requested_attention == "flash_attention_2":
        note = "padding-free batches (flash-attn variable-length kernel)"
    elif pack:
        pack = False
        note = f"--padding-free would not pay with {requested_attention} attention on this model (it needs a dense mask): padded batches instead"
    else:
        note = "padded batches"
    return Layout(attention, share, pack, note)
