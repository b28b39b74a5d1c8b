"""`mtdpo precompute-ref`: store the reference model's log-probs in the cache, once.

Training then reads them instead of running a reference model: half the forward passes and one
model's memory less per step. They are computed with the plan the training run will have (its
layout and precision, from the same options), so step 1 starts from a tie.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import set_seed
from trl.trainer.utils import add_fused_lm_head

from mtdpo.cache import Manifest, OpenCache, ReferenceInfo, check_model_matches, open_cache, write_reference
from mtdpo.cache.schema import REFERENCE_COLUMNS
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.data import PairCollator
from mtdpo.train.forward import fused_sequence_logps
from mtdpo.train.layout import choose_layout
from mtdpo.train.model import load_model_config, load_policy
from mtdpo.train.provenance import reference_identity


def precompute_reference(config: MtdpoConfig, progress: bool = True) -> Manifest:
    """Add reference log-probs to the cache `config.data[0]`: of `--ref-model`, by default `--model`
    (the tiny random model of `--seed` when neither is given). Returns the updated manifest."""
    name = config.ref_model or config.model
    cache = open_cache(config.data[0], verify=True, full=config.verify_cache)  # never vouch for changed bytes
    model_config = load_model_config(name, config.trust_remote_code)
    check_model_matches(cache, name, model_config.vocab_size, config.allow_mismatch)
    layout = choose_layout(
        config.attn_implementation, config.prefix_sharing, config.padding_free, model_config, config.prefix_forest
    )
    set_seed(config.seed)  # the tiny default model is random: the same seed as `mtdpo train` gives the same one
    model = load_policy(name, config.attn_implementation, torch.float32, config.trust_remote_code)
    model.set_attn_implementation(layout.attention)
    add_fused_lm_head(model)
    model.to(config.device).eval()
    collate = PairCollator(cache.manifest.tokenizer.pad_token_id or 0, **layout.collator_options())
    with autocast(config):
        chosen, rejected = reference_logps(model, cache, collate, config.per_device_eval_batch_size, progress)
    identity = reference_identity(name, config.seed)
    info = ReferenceInfo(
        model=name or "tiny random Gemma (seeded)",
        columns=list(REFERENCE_COLUMNS),
        precision="bf16" if config.bf16 else "fp32",
        **identity,
    )
    return write_reference(cache.path, cache.manifest, chosen, rejected, info)


def autocast(config: MtdpoConfig):
    """The mixed precision the training run will use (Trainer autocasts its forwards the same way)."""
    if not config.bf16:
        return contextlib.nullcontext()
    return torch.autocast(config.device.type, dtype=torch.bfloat16)


def reference_logps(
    model, cache: OpenCache, collate, batch_size: int, progress: bool = True
) -> tuple[list[float], list[float]]:
    """Summed log-probs of the trained tokens of every chosen and rejected sequence, in cache order."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("reference log-probs"), BarColumn(), MofNCompleteColumn(), TextColumn("pairs"))
    chosen, rejected = [], []
    with (
        Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress, transient=True) as bar,
        torch.no_grad(),
    ):
        task = bar.add_task("reference", total=len(cache))
        for start in range(0, len(cache), batch_size):
            batch = collate([cache.record(i) for i in range(start, min(start + batch_size, len(cache)))])
            batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logps, _ = fused_sequence_logps(model, batch)
            c, r = logps.float().chunk(2)
            chosen += c.tolist()
            rejected += r.tolist()
            bar.advance(task, len(c))
    return chosen, rejected
