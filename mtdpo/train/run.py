"""`mtdpo train`: open the caches, check them against the model, train, save."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as transformers_logging

from mtdpo.cache import check_model_matches, expand_cache_paths, has_reference_columns, open_caches, read_manifest
from mtdpo.errors import Interrupted, UsageError
from mtdpo.train.callbacks import MetricsFile, ProgressLine
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.data import PairCollator
from mtdpo.train.lora import add_lora, finish_adapters
from mtdpo.train.loss import LOSS_TYPES, NLL_NORMS, REFERENCE_FREE
from mtdpo.train.model import choose_layout, load_policy, load_reference
from mtdpo.train.provenance import check_provenance
from mtdpo.train.safety import StopOnSignal
from mtdpo.train.trainer import MultiTurnDPOTrainer


def check_lora_options(config: MtdpoConfig) -> None:
    if config.lora_r < 0:
        raise UsageError(f"--lora-r {config.lora_r}: the LoRA rank is a positive number (0 = full fine-tune)")
    if config.lora_r == 0:
        for flag, value in (("--merge-adapters", config.merge_adapters), ("--load-in-4bit", config.load_in_4bit)):
            if value:
                raise UsageError(f"{flag} needs LoRA adapters: pass --lora-r (e.g. 16)")
    if config.lora_r > 0 and config.model is None and is_deepspeed_zero3_enabled():
        raise UsageError(
            "LoRA with ZeRO-3 needs a saved --model: ZeRO-3 builds the random default model shard by shard"
        )


def save_random_base(policy, path: Path, config: MtdpoConfig) -> str:
    """The tiny random default model has no files for the adapters to load onto: save it."""
    if config.process_index == 0:
        policy.save_pretrained(str(path))
    return str(path)


def train(config: MtdpoConfig, callbacks: list[TrainerCallback] = ()) -> MultiTurnDPOTrainer:
    if config.loss_type not in LOSS_TYPES:
        raise UsageError(f"unknown --loss-type {config.loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if config.nll_norm not in NLL_NORMS:
        raise UsageError(f"unknown --nll-norm {config.nll_norm!r}; use one of {', '.join(NLL_NORMS)}")
    if config.loss_scope not in ("step", "micro_batch"):
        raise UsageError(f"unknown --loss-scope {config.loss_scope!r}; use step or micro_batch")
    if config.loss_type in REFERENCE_FREE and config.ref_model:
        raise UsageError(
            f"--loss-type {config.loss_type} is reference-free: it never uses --ref-model {config.ref_model}; drop one of them"
        )
    check_lora_options(config)
    config.data = expand_cache_paths(config.data)  # quoted globs → the caches they match
    train_data, manifest = open_caches(config.data, config.verify_cache)
    eval_data = open_caches([config.eval_data], config.verify_cache)[0] if config.eval_data else None

    set_seed(config.seed)  # the tiny default model is randomly initialised: make it reproducible
    transformers_logging.disable_progress_bar()  # "Writing model shards" bars at every checkpoint; ProgressLine reports the run
    dtype = torch.float32  # master weights; --bf16 trains in mixed precision
    policy = load_policy(config.model, config.attn_implementation, dtype, config.trust_remote_code, config.load_in_4bit)
    check_model_matches(manifest, config.model, policy.config.vocab_size, config.allow_mismatch, Path(config.data[0]))
    layout = choose_layout(config.attn_implementation, config.prefix_sharing, config.padding_free, policy.config)
    policy.set_attn_implementation(layout.attention)
    lora = config.lora_r > 0
    if lora:
        base = config.model or save_random_base(policy, Path(config.output_dir) / "base-model", config)
        policy = add_lora(
            policy,
            config.lora_r,
            config.lora_alpha,
            config.lora_dropout,
            config.lora_target_modules,
            config.activation_checkpointing,
        )
    precomputed = has_reference_columns(train_data)
    if config.loss_type not in REFERENCE_FREE:  # use reference columns only if they come from this run's reference
        used = list(config.data) if precomputed else []
        if eval_data is not None and has_reference_columns(eval_data):
            used.append(config.eval_data)
        check_provenance([(p, read_manifest(Path(p))) for p in used], config.ref_model, config.model, config.seed)
    # An eval cache without reference columns needs the reference even if the train cache has them.
    needs_reference = not precomputed or (eval_data is not None and not has_reference_columns(eval_data))
    no_reference_model = (
        not needs_reference or config.loss_type in REFERENCE_FREE or (lora and not config.ref_model)
    )  # LoRA: adapters off
    ref = (
        None
        if no_reference_model
        else load_reference(
            policy,
            config.ref_model,
            config.attn_implementation,
            dtype,
            config.trust_remote_code,
            policy_path=config.model,
            seed=config.seed,
        )
    )
    if ref is not None:
        ref.set_attn_implementation(layout.attention)

    output_dir = Path(config.output_dir)
    stop = StopOnSignal()  # SIGTERM: checkpoint, then stop (mtdpo/train/safety.py)
    callbacks = [stop, *callbacks]
    trainer = MultiTurnDPOTrainer(
        policy,
        ref,
        config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=PairCollator(manifest["tokenizer"]["pad_token_id"] or 0, **layout.collator_options()),
        callbacks=[MetricsFile(output_dir / "metrics.jsonl"), progress := ProgressLine(), *callbacks],
    )
    progress.header = (
        f"precision: {'bf16' if config.bf16 else 'fp32'} ({config.precision_note}); {layout.note}; {trainer.mfu_note}"
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLine prints a compact line instead of the raw dict
    resume = config.resume_from_checkpoint
    if resume == "auto":
        resume = get_last_checkpoint(str(output_dir))  # None when there is none yet: start fresh
    with stop.installed():
        trainer.train(resume_from_checkpoint=resume)
    if stop.stopped_at is not None:  # no final model: the run is not finished
        raise Interrupted(
            f"stopped by {signal.Signals(stop.stop_signal).name} after step {stop.stopped_at}; checkpoint saved to "
            f"{output_dir / f'checkpoint-{stop.stopped_at}'}; go on with --resume-from-checkpoint auto",
            stop.stop_signal,
        )
    # Segment attention needs mtdpo's batches: the saved and returned model gets the standard kernel back.
    policy.set_attn_implementation(config.attn_implementation)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        # The cache's tokenizer copy goes next to the model, so the result loads with AutoTokenizer.
        shutil.copytree(Path(config.data[0]) / "tokenizer", output_dir, dirs_exist_ok=True)
        if lora:
            finish_adapters(output_dir, base, config.merge_adapters, torch.bfloat16 if config.load_in_4bit else dtype)
    close_process_group()
    return trainer


def close_process_group() -> None:
    """Once every rank is done, close the process group. Left to interpreter exit, gloo's threads
    aborted 2 of 5 finished torchrun jobs ("terminate called without an active exception", exit -6
    after the model was saved), so the launcher reported a failed job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing the model: nobody leaves before it is done
        dist.destroy_process_group()
