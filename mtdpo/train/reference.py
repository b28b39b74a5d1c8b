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

from mtdpo.cache import (
    Manifest,
    OpenCache,
    ReferenceInfo,
    check_model_matches,
    open_cache,
    write_reference,
    write_reference_columns,
)
from mtdpo.cache.schema import REFERENCE_COLUMNS, reference_columns
from mtdpo.progress import phase
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.data import PairCollator
from mtdpo.train.forward import fused_sequence_logps
from mtdpo.train.kto_data import KtoCollator, KtoRows, kto_logps
from mtdpo.train.model import load_model_config, load_policy
from mtdpo.train.plan import layout_for
from mtdpo.train.provenance import reference_identity

LABEL = "reference log-probs"


def precompute_reference(config: MtdpoConfig, progress: bool = True) -> Manifest:
    """Add reference log-probs to the cache `config.data[0]`: of `--ref-model`, by default `--model`
    (the tiny random model of `--seed` when neither is given). Returns the updated manifest."""
    name = config.ref_model or config.model
    # Every file re-hashed, whatever its stamp says: the checksums this run writes must never vouch
    # for changed bytes (hashing costs little beside a forward pass over every record).
    cache = open_cache(config.data[0], verify=True, full=True)
    model_config = load_model_config(name, config.trust_remote_code)
    check_model_matches(cache, name, model_config.vocab_size, config.allow_mismatch)
    layout = layout_for(config, cache, model_config)
    set_seed(config.seed)  # the tiny default model is random: the same seed as `mtdpo train` gives the same one
    with phase(f"loading {name or 'the tiny random model'}", enabled=progress):
        model = load_policy(name, config.attn_implementation, torch.float32, config.trust_remote_code)
    model.set_attn_implementation(layout.attention)
    add_fused_lm_head(model)
    model.to(config.device).eval()
    with phase("fingerprinting the reference's weights", enabled=progress):
        identity = reference_identity(name, config.seed)
    if cache.is_kto:
        return precompute_kto(model, cache, config, layout, identity, progress)
    collate = PairCollator(cache.manifest.tokenizer.pad_token_id or 0, **layout.collator_options())
    with autocast(config):
        chosen, rejected = reference_logps(model, cache, collate, config.per_device_eval_batch_size, progress)
    info = ReferenceInfo(
        model=name or "tiny random Gemma (seeded)",
        columns=list(REFERENCE_COLUMNS),
        precision="bf16" if config.bf16 else "fp32",
        **identity,
    )
    return write_reference(cache.path, cache.manifest, chosen, rejected, info)


def precompute_kto(model, cache: OpenCache, config: MtdpoConfig, layout, identity: dict, progress: bool) -> Manifest:
    """A KTO cache's reference log-probs: of each row and of its KL sequence. The KL partners are
    those of a run with this --per-device-train-batch-size (recorded: train refuses another)."""
    batch_size = config.per_device_train_batch_size
    rows = KtoRows(cache, batch_size)
    options = layout.collator_options()
    collate = KtoCollator(
        cache.manifest.tokenizer.pad_token_id or 0,
        options["padding_free"],
        options["segments"],
        cache.manifest.max_length,
    )
    values = [[], []]  # rows, KL sequences
    with autocast(config), torch.no_grad(), phase(LABEL, len(rows), "rows", progress) as advance:
        for start in range(0, len(rows), config.per_device_eval_batch_size):
            batch = collate([rows[i] for i in range(start, min(start + config.per_device_eval_batch_size, len(rows)))])
            logps, _, kl_logps = kto_logps(model, to_device(batch, model.device))
            values[0] += logps.float().tolist()
            values[1] += kl_logps.float().tolist()
            advance(len(batch["rows"]))
    info = ReferenceInfo(
        model=config.ref_model or config.model or "tiny random Gemma (seeded)",
        columns=list(reference_columns(cache.kind)),
        precision="bf16" if config.bf16 else "fp32",
        kl_batch_size=batch_size,
        **identity,
    )
    return write_reference_columns(cache.path, cache.manifest, values, info)


def autocast(config: MtdpoConfig):
    """The mixed precision the training run will use (Trainer autocasts its forwards the same way)."""
    if not config.bf16:
        return contextlib.nullcontext()
    return torch.autocast(config.device.type, dtype=torch.bfloat16)


def reference_logps(
    model, cache: OpenCache, collate, batch_size: int, progress: bool = True
) -> tuple[list[float], list[float]]:
    """Summed log-probs of the trained tokens of every chosen and rejected sequence, in cache order."""
    chosen, rejected = [], []
    with phase(LABEL, len(cache), "pairs", progress) as advance, torch.no_grad():
        for start in range(0, len(cache), batch_size):
            batch = collate([cache.record(i) for i in range(start, min(start + batch_size, len(cache)))])
            batch = to_device(batch, model.device)
            logps, _ = fused_sequence_logps(model, batch)
            c, r = logps.float().chunk(2)
            chosen += c.tolist()
            rejected += r.tolist()
            advance(len(c))
    return chosen, rejected


def to_device(batch, device):
    """A batch's tensors, in its sub-batches too, on `device` (lists stay as they are)."""
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch
