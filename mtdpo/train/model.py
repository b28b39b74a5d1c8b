"""Load the policy and its frozen reference. Never loads a tokenizer. (LoRA: train/lora.py.)"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from mtdpo import hub
from mtdpo.assets import TINY_MODEL
from mtdpo.errors import UsageError
from mtdpo.train.lora import qlora_config


def attention_kernel(requested: str) -> str:
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UsageError(
            "--attn-implementation flash_attention_2 needs flash-attn: pip install 'mtdpo[gpu]' (or use sdpa)"
        )
    return requested


def load_model_config(name_or_path: str | None, trust_remote_code: bool):
    """The model's config alone (no weights): what the run's plan needs to choose a layout."""
    if name_or_path is None:
        return AutoConfig.from_pretrained(str(TINY_MODEL))
    if looks_local(name_or_path) and not Path(name_or_path).exists():  # HF would answer about repo-id syntax
        raise UsageError(f"model not found: {name_or_path} (no such directory)")
    offline = hub.unreachable() if hub.looks_like_hub_name(name_or_path) else None  # then only the hub cache
    try:
        return AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, local_files_only=bool(offline)
        )
    except (OSError, ValueError) as err:
        if offline:
            raise hub.no_network("model", name_or_path, offline) from None
        raise UsageError(f"model not found or not loadable: {name_or_path} ({str(err).splitlines()[0]})") from None


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


def has_unused_parameters(model) -> bool:
    """Whether a text forward leaves trainable parameters without a gradient: a multimodal
    checkpoint's vision or audio tower. DDP must then search for them every step
    (find_unused_parameters=True); for a text model that search finds nothing, costs a walk of
    the graph per step and warns on every rank of every run. (Tied embeddings are one parameter,
    LoRA's frozen base is not trained, and the fused LM head still reaches the head's weight.)"""
    return any(getattr(model.config, tower, None) is not None for tower in ("vision_config", "audio_config"))
