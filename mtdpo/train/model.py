"""Load the policy and its frozen reference. Never loads a tokenizer. (LoRA: train/lora.py.)"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from mtdpo.errors import UsageError
from mtdpo.tokenizer import ASSETS
from mtdpo.train.attention import SEGMENT_ATTENTION
from mtdpo.train.lora import qlora_config

TINY_MODEL = ASSETS / "tiny-gemma"  # config.json of a 0.5M-parameter Gemma sized to the embedded tokenizer


def attention_kernel(requested: str) -> str:
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UsageError(
            "--attn-implementation flash_attention_2 needs flash-attn: pip install 'mtdpo[gpu]' (or use sdpa)"
        )
    return requested


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

    def collator_options(self) -> dict:
        """Keyword arguments of data.PairCollator for this layout."""
        return {
            "padding_free": self.padding_free,
            "prefix_sharing": self.prefix_sharing,
            "segments": self.attention == SEGMENT_ATTENTION,
        }


def choose_layout(requested_attention: str, prefix_sharing: bool | None, padding_free: bool, model_config) -> Layout:
    """sdpa (the default) becomes segment attention where it is exact: padding is then never
    computed, packed and prefix-shared rows need no [T, T] mask, and prefix sharing is on unless
    turned off. flash_attention_2 packs through its variable-length kernel; eager (or a model
    segment attention does not fit) cannot pack without a dense mask, so it gets padded batches."""
    segments = requested_attention == "sdpa" and segments_fit(model_config)
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


def load_policy(
    name_or_path: str | None,
    attn_implementation: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    load_in_4bit: bool = False,
):
    attn = attention_kernel(attn_implementation)
    if name_or_path is None:  # random init: the seed (set by the caller) makes it reproducible
        if load_in_4bit:
            raise UsageError("--load-in-4bit quantizes a pretrained model: pass --model")
        config = AutoConfig.from_pretrained(str(TINY_MODEL))
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    if looks_local(name_or_path) and not Path(name_or_path).exists():  # HF would answer about repo-id syntax
        raise UsageError(f"model not found: {name_or_path} (no such directory)")
    quantized = qlora_config() if load_in_4bit else {}
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, attn_implementation=attn, dtype=dtype, trust_remote_code=trust_remote_code, **quantized
        )
    except OSError as err:
        raise UsageError(f"model not found or not loadable: {name_or_path} ({str(err).splitlines()[0]})") from None


def looks_local(name_or_path: str) -> bool:
    """A path the user meant on this machine (/x, ./x, ~/x, a/b/c), not a hub id (owner/name)."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1


def load_reference(
    policy,
    name_or_path: str | None,
    attn_implementation: str,
    dtype,
    trust_remote_code: bool,
    *,
    policy_path: str | None = None,
    seed: int = 42,
):
    """A frozen copy of the policy as loaded, or a separate --ref-model."""
    if name_or_path is not None:
        ref = load_policy(name_or_path, attn_implementation, dtype, trust_remote_code)
    elif is_deepspeed_zero3_enabled():
        # ZeRO-3 partitioned the policy's weights across ranks while loading it, so a deep copy would
        # hold empty shards: build the policy a second time (same path, or same seed for the random model).
        set_seed(seed)
        ref = load_policy(policy_path, attn_implementation, dtype, trust_remote_code)
    else:
        ref = copy.deepcopy(policy)
    ref.eval()
    ref.requires_grad_(False)
    return ref
