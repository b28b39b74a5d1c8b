"""`mtdpo train`: open the caches, check them against the model, train, save."""

from __future__ import annotations

import signal
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback, set_seed
from transformers.utils import logging as transformers_logging

from mtdpo.cache import check_model_matches, expand_cache_paths, open_caches
from mtdpo.errors import Interrupted
from mtdpo.progress import phase
from mtdpo.train.callbacks import MetricsFile, ProgressLine
from mtdpo.train.checkpoints import resume_point, run_record
from mtdpo.train.config import MtdpoConfig, library_output_to_stderr
from mtdpo.train.data import PairCollator
from mtdpo.train.kto_trainer import kto_run_parts
from mtdpo.train.lora import add_lora, finish_adapters
from mtdpo.train.model import has_unused_parameters, load_model_config, load_policy, load_reference
from mtdpo.train.plan import make_plan
from mtdpo.train.safety import StopOnSignal
from mtdpo.train.throughput import peak_flops
from mtdpo.train.trainer import MultiTurnDPOTrainer


def save_random_base(policy, path: Path, config: MtdpoConfig) -> str:
    """The tiny random default model has no files for the adapters to load onto: save it."""
    if config.process_index == 0:
        policy.save_pretrained(str(path))
    return str(path)


def train(config: MtdpoConfig, callbacks: list[TrainerCallback] = ()) -> MultiTurnDPOTrainer:
    config.data = expand_cache_paths(config.data)  # quoted globs → the caches they match
    train_data = open_caches(config.data, config.verify_cache)
    train_data.tokenizer_copy()  # refused now, not after training: code nobody trusted, a symlink
    eval_data = open_caches([config.eval_data], config.verify_cache) if config.eval_data else None
    model_config = load_model_config(config.model, config.trust_remote_code)
    check_model_matches(train_data, config.model, model_config.vocab_size, config.allow_mismatch)
    plan = make_plan(config, train_data, eval_data, model_config)
    record = run_record(config, train_data.paths, train_data.kind)
    resume = resume_point(config, record)  # checked before any model is loaded

    if config.process_index == 0:  # the first line, before minutes of model loading: what the run will do
        print(f"{plan.describe()}; {peak_flops(config.device, plan.bf16)[1]}", flush=True)

    set_seed(config.seed)  # the tiny default model is randomly initialised: make it reproducible
    transformers_logging.disable_progress_bar()  # "Writing model shards" bars at every checkpoint; ProgressLine reports the run
    dtype = torch.float32  # master weights; --bf16 trains in mixed precision
    with phase(f"loading {config.model or 'the tiny random model'}", enabled=config.process_index == 0):
        policy = load_policy(
            config.model, config.attn_implementation, dtype, config.trust_remote_code, config.load_in_4bit
        )
    policy.set_attn_implementation(plan.layout.attention)
    if config.ddp_find_unused_parameters is None:  # transformers' default for a model without checkpointing: True
        config.ddp_find_unused_parameters = has_unused_parameters(policy)
    if plan.lora:
        base = config.model or save_random_base(policy, Path(config.output_dir) / "base-model", config)
        policy = add_lora(
            policy,
            config.lora_r,
            config.lora_alpha,
            config.lora_dropout,
            config.lora_target_modules,
            config.activation_checkpointing,
        )
    ref = None
    if plan.loads_reference_model:
        with phase(f"loading the reference ({plan.reference.value})", enabled=config.process_index == 0):
            ref = load_reference(
                policy,
                config.ref_model,
                config.attn_implementation,
                dtype,
                config.trust_remote_code,
                policy_path=config.model,
                seed=config.seed,
            )
        ref.set_attn_implementation(plan.layout.attention)

    output_dir = Path(config.output_dir)
    stop = StopOnSignal()  # SIGTERM: checkpoint, then stop (mtdpo/train/safety.py)
    callbacks = [stop, *callbacks]
    parts = {  # a pair cache's; a KTO cache's rows come with their KL partners (kto_trainer.py)
        "trainer": MultiTurnDPOTrainer,
        "train_dataset": train_data.pairs,
        "eval_dataset": None if eval_data is None else eval_data.pairs,
        "collator": PairCollator(train_data.manifest.tokenizer.pad_token_id or 0, **plan.layout.collator_options()),
        "advice": None,
    }
    if train_data.is_kto:
        parts = kto_run_parts(config, plan, train_data, eval_data)
    with library_output_to_stderr():  # the accelerator starts here: DeepSpeed builds and announces its ops
        trainer = parts["trainer"](
            policy,
            ref,
            config,
            plan,
            train_dataset=parts["train_dataset"],
            eval_dataset=parts["eval_dataset"],
            data_collator=parts["collator"],
            callbacks=[MetricsFile(output_dir / "metrics.jsonl"), progress := ProgressLine(), *callbacks],
        )
    progress.header = f"KTO weights: {parts['advice']}" if parts["advice"] else ""
    trainer.remove_callback(PrinterCallback)  # ProgressLine prints a compact line instead of the raw dict
    trainer.run_record = record
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
        # The cache's tokenizer files go next to the model, so the result loads with AutoTokenizer.
        train_data.copy_tokenizer(output_dir)
        if plan.lora:
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
