"""A slim transformers.Trainer for multi-turn DPO + NLL.

Trainer brings accelerate, DeepSpeed ZeRO-2/3, FSDP, gradient accumulation, checkpoints,
resume and loggers; this class only says how a batch becomes a loss and what to log.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import rotate_checkpoints
from trl.trainer.utils import add_fused_lm_head

from mtdpo.train import checkpoints
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.forward import fused_sequence_logps, real_tokens
from mtdpo.train.lora import adapters_disabled, is_lora
from mtdpo.train.loss import dpo_loss, nll_loss, sequence_nll_loss
from mtdpo.train.plan import Plan, Reference
from mtdpo.train.safety import NonFiniteGuard, zero_gradient
from mtdpo.train.sampler import (
    EpochSeededSampler,
    GroupedBatchSampler,
    group_batches,
    length_grouped_order,
    random_order,
)
from mtdpo.train.throughput import mfu_percent, peak_flops


class MultiTurnDPOTrainer(Trainer):
    def __init__(self, model, ref_model, args: MtdpoConfig, plan: Plan, **kwargs):
        # TRL's fused LM head: log-probs of the trained positions only, in chunks, without
        # materialising the [batch, seq, vocab] logits (nor their log-softmax).
        add_fused_lm_head(model.get_base_model() if is_lora(model) else model)
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the model computes no loss: objective() does
        # --loss-scope step: each micro-batch's loss is already its share of the step's (see objective).
        self.loss_is_scaled_for_ga = args.loss_scope == "step"
        if ref_model is not None:
            add_fused_lm_head(ref_model)
            ref_model = self._prepare_reference(ref_model)
        self.ref_model, self.plan = ref_model, plan
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.nonfinite = NonFiniteGuard(args.skip_nonfinite, self)
        self.add_callback(self.nonfinite)
        self._tokens_since_log, self._sequences_since_log, self._last_log_time = 0, 0, time.perf_counter()
        self.peak_flops = peak_flops(self.args.device, bool(self.args.bf16))[0]  # run.py prints why when None
        self.run_record: dict | None = None  # what each checkpoint records (run.py sets it: checkpoints.run_record)

    def _prepare_reference(self, ref_model):
        if self.is_deepspeed_enabled:  # ZeRO-3 must shard the reference too
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:  # accelerate leaves a model prepared for evaluation unwrapped, on the CPU
            from trl.models.utils import prepare_fsdp

            return prepare_fsdp(ref_model, self.accelerator)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    # Length grouping on the longer side of each pair (the cache's length columns), so that
    # batches need little padding; `--train-sampling-strategy random` turns it off. Both orders
    # are pure functions of (seed, epoch), so a resumed run replays the same batches.
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.args.group_by_prompt or self.args.max_tokens_per_batch:
            keys, suffix, prompt = dataset.prompts()
            if not self.args.group_by_prompt:  # token budget only: every pair a group of its own
                keys = np.arange(len(keys))
            batches = group_batches(
                keys, suffix, prompt, seed, self.args.per_device_train_batch_size, self.args.max_tokens_per_batch
            )
            self._epoch_sampler = GroupedBatchSampler(batches, seed, self.args.process_index, self.args.world_size)
        elif self._groups_by_length(dataset):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            self._epoch_sampler = EpochSeededSampler(length_grouped_order(dataset.lengths(), batch), len(dataset), seed)
        elif self.args.train_sampling_strategy == "random":
            self._epoch_sampler = EpochSeededSampler(random_order, len(dataset), seed)
        else:
            return super()._get_train_sampler(train_dataset)
        return self._epoch_sampler

    def _run_epoch(self, *args, **kwargs):
        # Resumed at the last step (a SIGTERM during it): nothing to train; Trainer would train step max + 1.
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        # Trainer hands the epoch to the sampler through the dataloader's wrappers, but not through
        # the ones that skip a resumed epoch's first batches on several ranks: set it here.
        if getattr(self, "_epoch_sampler", None) is not None:
            self._epoch_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's save, then the marker that makes it complete (checkpoints.seal), then the
        rotation of old checkpoints: never one deleted before the new one is complete."""
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.exists():  # an interrupted save's leftovers: none may outlive it
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # Trainer would rotate before the seal
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (DeepSpeed, FSDP shards) are written
        if self.args.should_save:
            checkpoints.seal(folder, self.run_record)
            rotate_checkpoints(str(folder.parent), limit, self.state.best_model_checkpoint, use_mtime=True)

    def _get_eval_sampler(self, eval_dataset):
        if not self._groups_by_length(eval_dataset):
            return super()._get_eval_sampler(eval_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(
            self.args.eval_batch_size,
            lengths=eval_dataset.lengths().tolist(),
            generator=torch.Generator().manual_seed(seed),
        )

    def _groups_by_length(self, dataset) -> bool:
        return self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        reference = self.plan.reference if mode == "train" else self.plan.eval_reference
        loss, metrics = self.batch_loss(
            model, inputs, reference, step_counts=num_items_in_batch if mode == "train" else None
        )
        if mode == "train" and not self.nonfinite.finite(
            loss, inputs.get("rows"), self.state.global_step + 1, self.accelerator
        ):
            loss, metrics = zero_gradient(model), {}  # --skip-nonfinite: the step will be skipped
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        if mode == "train":
            self._tokens_since_log += int(self.accelerator.gather(real_tokens(inputs)).sum())
            self._sequences_since_log += self._sequences(inputs) * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite.add_loss(loss)  # what Trainer adds to the logged loss, taken back if the step is skipped
        return loss

    def forget_loss(self, loss) -> None:
        """Take a skipped step's batches out of the loss Trainer sums for its next logged line."""
        if isinstance(getattr(self, "_tr_loss", None), torch.Tensor):
            self._tr_loss -= loss

    def batch_loss(self, model, inputs, reference=None, step_counts=None) -> tuple[torch.Tensor, dict[str, float]]:
        """A batch's loss and logged metrics: here a pair batch's (`pair_loss`)."""
        return self.pair_loss(model, inputs, reference, step_counts)

    def _sequences(self, inputs) -> int:
        """Sequences whose tokens `real_tokens` counts (for the mean length of MFU): both sides of each pair."""
        return 2 * len(inputs["rows"])

    def _get_num_items_in_batch(self, batch_samples: list, device) -> torch.Tensor | None:
        """[pairs, trained chosen tokens] of the optimizer step, over every micro-batch and rank:
        what `objective` divides by (Trainer's own count would be all labels, rejected ones too).
        Trainer passes it to compute_loss as `num_items_in_batch`."""
        if self.args.loss_scope != "step" or not batch_samples:
            return None
        counts = torch.tensor([[len(b["rows"]), int(b["chosen_tokens"])] for b in batch_samples]).sum(0)
        return self.accelerator.reduce(counts.to(device), reduction="sum")

    def pair_loss(
        self, model, inputs, reference: Reference | None = None, step_counts=None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One forward of chosen + rejected; DPO on summed log-probs + NLL. `reference`: where the
        batch's reference log-probs come from (by default, as for training batches)."""
        reference = reference or self.plan.reference
        logps, tokens = fused_sequence_logps(model, inputs)
        return self.objective(logps, self.reference_logps(model, inputs, reference), tokens, step_counts)

    def reference_logps(self, model, inputs, reference: Reference) -> torch.Tensor | None:
        """The batch's reference log-probs, from where the plan says (None: a reference-free loss)."""
        if reference is Reference.NONE:
            return None
        if reference is Reference.COLUMNS:
            return inputs["ref_logps"]
        with torch.no_grad(), self.reference_model(model, reference) as frozen:
            return fused_sequence_logps(frozen, inputs)[0]

    @contextlib.contextmanager
    def reference_model(self, model, reference: Reference):
        """The frozen reference model, or the LoRA policy with its adapters off."""
        if reference is Reference.ADAPTERS_OFF:
            with adapters_disabled(self.accelerator.unwrap_model(model)):
                yield model
        else:
            yield self.ref_model

    def objective(self, logps, ref_logps, tokens, step_counts=None) -> tuple[torch.Tensor, dict[str, float]]:
        """[2B] summed log-probs (chosen rows, then rejected) -> loss and logged metrics.

        `step_counts` = [pairs, trained chosen tokens] of the whole optimizer step (all
        micro-batches, all ranks): the loss is then this micro-batch's share of the step's DPO
        mean over pairs and NLL over tokens, the shares summing to the step's loss. None (eval,
        `--loss-scope micro_batch`): means over this micro-batch of all ranks, which Trainer
        averages over the accumulation steps.
        """
        args: MtdpoConfig = self.args
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = (None, None) if ref_logps is None else ref_logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            args.beta,
            args.loss_type,
            args.label_smoothing,
            chosen_tokens,
            rejected_tokens,
            args.simpo_gamma,
        )
        if step_counts is None:  # this micro-batch alone, of every rank
            micro_batches = 1
            counts = torch.tensor([len(chosen_tokens), int(chosen_tokens.sum())], device=tokens.device)
            step_counts = self.accelerator.reduce(counts, reduction="sum")
        else:
            micro_batches = self.current_gradient_accumulation_steps
        pairs, total_tokens = step_counts
        if args.nll_norm == "sequence":  # a mean over pairs, like the DPO term
            nll = sequence_nll_loss(chosen, chosen_tokens, pairs)
        else:
            nll = nll_loss(chosen, chosen_tokens, total_tokens)
        dpo = losses.sum() / pairs
        # DDP (and ZeRO, FSDP) average the gradient over ranks: x world size makes it their sum.
        loss = (dpo + args.nll_coef * nll) * self.accelerator.num_processes
        # Logged: the step's values (shares summed over ranks, x the micro-batches Trainer averages over).
        dpo, nll = dpo.detach() * micro_batches, nll.detach() * micro_batches

        gather = self.accelerator.gather_for_metrics
        margins = chosen_rewards - rejected_rewards
        metrics = {
            "dpo_loss": gather(dpo).sum().item(),
            "nll": gather(nll).sum().item(),
            "rewards/chosen": gather(chosen_rewards).mean().item(),
            "rewards/rejected": gather(rejected_rewards).mean().item(),
            "rewards/margins": gather(margins).mean().item(),
            "rewards/accuracies": gather((margins > 0).float()).mean().item(),
            "rewards/ties": gather((margins == 0).float()).mean().item(),  # policy == reference: printed as "tie"
            "logps/chosen": gather(chosen.detach()).mean().item(),
            "logps/rejected": gather(rejected.detach()).mean().item(),
        }
        return loss, metrics

    def skipped_steps_line(self, logs: dict) -> None:
        """A logged line over steps of which some were skipped (--skip-nonfinite): its loss is the
        mean of the kept steps' (Trainer divided their sum by every step); a line of skipped steps
        only has no loss, and `skipped` says how many it covers."""
        kept, skipped = self.nonfinite.interval()
        if self.nonfinite.skipped:
            logs["nonfinite_skipped"] = self.nonfinite.skipped  # steps skipped so far
        if not skipped:
            return
        logs["skipped"] = skipped  # steps of this line
        if kept:
            logs["loss"] *= (kept + skipped) / kept
        else:
            del logs["loss"]
            logs.pop("grad_norm", None)

    def skipped_steps_summary(self, logs: dict) -> None:
        """The run's mean loss over its kept steps (Trainer divides by every step)."""
        logs["nonfinite_skipped"] = self.nonfinite.skipped
        kept = self.state.global_step - self.nonfinite.skipped
        logs["train_loss"] = logs["train_loss"] * self.state.global_step / kept if kept > 0 else float("nan")

    def evaluate(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:  # tokens/s is training throughput: the eval's minutes are not in its interval
            self._last_log_time += time.perf_counter() - started

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
        self._metrics[mode].clear()
        if mode == "train" and "train_loss" in logs and self.nonfinite.skipped:
            self.skipped_steps_summary(logs)
        if mode == "train" and "loss" in logs:
            self.skipped_steps_line(logs)
            now = time.perf_counter()
            tokens_per_second = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
            logs["tokens_per_second"] = round(tokens_per_second, 1)
            if self.peak_flops and self._sequences_since_log:
                mean_length = self._tokens_since_log / self._sequences_since_log
                logs["mfu"] = round(
                    mfu_percent(
                        self.model.config,
                        tokens_per_second,
                        mean_length,
                        self.peak_flops,
                        self.accelerator.num_processes,
                    ),
                    2,
                )
            self._tokens_since_log, self._sequences_since_log, self._last_log_time = 0, 0, now
        super().log(logs, start_time)
