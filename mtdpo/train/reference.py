"""`mtdpo precompute-ref`: store the reference model's log-probs in the cache, once.

Training then reads `ref_chosen_logp`/`ref_rejected_logp` from the shards and never loads a
reference model: half the forward passes and one model's memory less per step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import set_seed
from trl.trainer.utils import add_fused_lm_head

from mtdpo.cache import (
    REF_COLUMNS,
    check_model_matches,
    load_cache,
    read_manifest,
    write_checksums,
    write_json,
    writing,
)
from mtdpo.train.data import PairCollator
from mtdpo.train.model import load_policy
from mtdpo.train.provenance import reference_identity
from mtdpo.train.trainer import fused_sequence_logps


def reference_logps(
    model, dataset, pad_token_id: int, batch_size: int, progress: bool = True
) -> tuple[list[float], list[float]]:
    """Summed log-probs of the trained tokens of every chosen and rejected sequence."""
    from rich.progress import Progress

    collate = PairCollator(pad_token_id)
    chosen, rejected = [], []
    pairs = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
    with Progress(disable=not progress, transient=True) as bar, torch.no_grad():
        task = bar.add_task("reference log-probs", total=len(pairs))
        for start in range(0, len(pairs), batch_size):
            rows = pairs[start : start + batch_size]
            batch = collate([dict(zip(rows, values)) for values in zip(*rows.values())])
            logps, _ = fused_sequence_logps(model, batch)
            c, r = logps.float().chunk(2)
            chosen += c.tolist()
            rejected += r.tolist()
            bar.advance(task, len(c))
    return chosen, rejected


def precompute_reference(
    cache: Path,
    model_name: str | None = None,
    batch_size: int = 8,
    seed: int = 42,
    attn_implementation: str = "sdpa",
    allow_mismatch: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """Add the reference columns to `cache` (rewritten atomically); returns the manifest."""
    from datasets import Value

    cache = Path(cache)
    manifest = read_manifest(cache)
    dataset = load_cache(cache)
    set_seed(seed)  # the tiny default model is random: the same seed as `mtdpo train` gives the same one
    model = load_policy(model_name, attn_implementation, torch.float32, trust_remote_code)
    check_model_matches(manifest, model_name, model.config.vocab_size, allow_mismatch, cache)
    add_fused_lm_head(model)
    model.eval()
    identity = reference_identity(model_name, seed)
    chosen, rejected = reference_logps(model, dataset, manifest["tokenizer"]["pad_token_id"] or 0, batch_size, progress)

    base = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
    float32 = Value("float32")
    with_ref = base.add_column(REF_COLUMNS[0], chosen, feature=float32).add_column(
        REF_COLUMNS[1], rejected, feature=float32
    )
    with writing(cache, kind="ref") as tmp:
        with_ref.save_to_disk(str(tmp))
        for extra in ("stats.json", "rejects.jsonl", "tokenizer"):  # checksums.json is rewritten below
            source = cache / extra
            if source.is_dir():
                shutil.copytree(source, tmp / extra)
            elif source.exists():
                shutil.copy2(source, tmp / extra)
        # Which model made the columns: train uses them only with the same reference (provenance.py).
        manifest["reference"] = {
            "model": model_name or "tiny random Gemma (seeded)",
            **identity,
            "columns": list(REF_COLUMNS),
        }
        write_json(tmp / "manifest.json", manifest)
        write_checksums(tmp)  # the new shards' sizes and SHA-256, checked when the cache is opened
        del dataset, base, with_ref  # release the memory maps of the old shards before replacing them
    return manifest
