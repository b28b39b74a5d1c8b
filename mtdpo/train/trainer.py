"""A slim transformers.Trainer for multi-turn DPO + NLL.

Trainer brings accelerate, DeepSpeed ZeRO-2/3, FSDP, gradient accumulation, checkpoints,
resume and loggers; this class only says how a batch becomes a loss and what to log.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl.trainer.utils import add_fused_lm_head

from mtdpo.cache import IGNORE_INDEX
from mtdpo.train.attention import SEGMENT_ATTENTION
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.lora import adapters_disabled, is_lora
from mtdpo.train.loss import REFERENCE_FREE, dpo_loss, nll_loss, sequence_nll_loss
from mtdpo.train.safety import NonFiniteGuard, zero_gradient
from mtdpo.train.throughput import mfu_percent, peak_flops


class MultiTurnDPOTrainer(Trainer):
    def __init__(self, model, ref_model, args: MtdpoConfig, **kwargs):
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
        self.ref_model = ref_model
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.nonfinite = NonFiniteGuard(args.skip_nonfinite)
        self._tokens_since_log, self._sequences_since_log, self._last_log_time = 0, 0, time.perf_counter()
        self.peak_flops, self.mfu_note = peak_flops(self.args.device, bool(self.args.bf16))

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
        if self._groups_by_length(dataset):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            self._epoch_sampler = EpochSeededSampler(
                length_grouped_order(pair_lengths(dataset), batch), len(dataset), seed
            )
        elif self.args.train_sampling_strategy == "random":
            self._epoch_sampler = EpochSeededSampler(random_order, len(dataset), seed)
        else:
            return super()._get_train_sampler(train_dataset)
        return self._epoch_sampler

    def _run_epoch(self, *args, **kwargs):
        # Trainer hands the epoch to the sampler through the dataloader's wrappers, but not through
        # the ones that skip a resumed epoch's first batches on several ranks: set it here.
        if getattr(self, "_epoch_sampler", None) is not None:
            self._epoch_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def _get_eval_sampler(self, eval_dataset):
        if not self._groups_by_length(eval_dataset):
            return super()._get_eval_sampler(eval_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(
            self.args.eval_batch_size,
            lengths=pair_lengths(eval_dataset).tolist(),
            generator=torch.Generator().manual_seed(seed),
        )

    def _groups_by_length(self, dataset) -> bool:
        return self.args.train_sampling_strategy == "group_by_length" and "chosen_len" in getattr(
            dataset, "column_names", ()
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        loss, metrics = self.pair_loss(model, inputs, step_counts=num_items_in_batch if mode == "train" else None)
        if mode == "train" and not self.nonfinite.finite(
            loss, inputs.get("rows"), self.state.global_step + 1, self.accelerator
        ):
            loss, metrics = zero_gradient(model, loss), {}  # --skip-nonfinite: the batch moves no weight
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        if mode == "train":
            self._tokens_since_log += int(self.accelerator.gather(real_tokens(inputs)).sum())
            self._sequences_since_log += 2 * len(inputs["rows"]) * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples: list, device) -> torch.Tensor | None:
        """[pairs, trained chosen tokens] of the optimizer step, over every micro-batch and rank:
        what `objective` divides by (Trainer's own count would be all labels, rejected ones too).
        Trainer passes it to compute_loss as `num_items_in_batch`."""
        if self.args.loss_scope != "step" or not batch_samples:
            return None
        counts = torch.tensor([[len(b["rows"]), int(b["chosen_tokens"])] for b in batch_samples]).sum(0)
        return self.accelerator.reduce(counts.to(device), reduction="sum")

    def pair_loss(self, model, inputs, step_counts=None) -> tuple[torch.Tensor, dict[str, float]]:
        """One concatenated forward of chosen + rejected; DPO on summed log-probs + NLL."""
        logps, tokens = fused_sequence_logps(model, inputs)
        if self.args.loss_type in REFERENCE_FREE:
            ref_logps = None  # SimPO: no reference forward
        elif "ref_logps" in inputs:
            ref_logps = inputs["ref_logps"]
        else:
            with torch.no_grad(), self.reference(model) as reference:
                ref_logps, _ = fused_sequence_logps(reference, inputs)
        return self.objective(logps, ref_logps, tokens, step_counts)

    @contextlib.contextmanager
    def reference(self, model):
        """The frozen reference model; for a LoRA policy without one, the policy with its adapters off."""
        if self.ref_model is None and is_lora(self.accelerator.unwrap_model(model)):
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
        if mode == "train" and "loss" in logs:
            if self.nonfinite.skipped:
                logs["nonfinite_skipped"] = self.nonfinite.skipped  # batches skipped so far
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


def fused_sequence_logps(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss.sequence_logps` computed through the fused head: the same numbers (tested),
    without the logits, summed in fp32. Works on every layout of `data.PairCollator`:
    padded [2B, T] rows, and packed or prefix-shared rows, whose `logp_index` says which
    predicted position counts for which sequence."""
    segments = inputs.get("segments") if uses_segment_attention(model) else None
    # With segments, a mask of ones: transformers then builds no [T, T] mask (the segments say it
    # all). Other kernels get the batch's own mask, or none for a packed row (positions mark it).
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=torch.ones_like(inputs["input_ids"]) if segments is not None else inputs.get("attention_mask"),
        position_ids=inputs.get("position_ids"),
        labels=inputs["labels"],
        fused_lm_head=True,
        use_cache=False,
        **({} if segments is None else {"segments": segments.tolist()}),  # read by attention.segment_attention
    )
    log_probs = out.log_probs.float()
    if "logp_index" not in inputs:
        return log_probs.sum(-1), (inputs["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    position, sequence = inputs["logp_index"]
    n = 2 * len(inputs["rows"])
    logps = log_probs.new_zeros(n).index_add(0, sequence, log_probs[0, position])
    return logps, torch.bincount(sequence, minlength=n)


def uses_segment_attention(model) -> bool:
    config = getattr(getattr(model, "module", model), "config", None)  # DDP / DeepSpeed wrap the model in .module
    return getattr(config, "_attn_implementation", None) == SEGMENT_ATTENTION


def real_tokens(inputs: dict) -> torch.Tensor:
    """Tokens of both sequences of every pair, padding not counted: the same in every layout
    (a prefix-shared batch processes fewer, as the prompt goes through the model once)."""
    if "pair_tokens" in inputs:
        return inputs["pair_tokens"]
    mask = inputs.get("attention_mask")
    return (
        mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
    )


class EpochSeededSampler(torch.utils.data.Sampler):
    """Indices in the order `order(n, generator)` drawn with a generator seeded by seed + epoch.

    transformers' LengthGroupedSampler shuffles with the global RNG, whose state after a resume
    differs from the uninterrupted run's: a run resumed inside epoch 2 trained some pairs twice
    and others never. Here the order depends on nothing but (seed, epoch), on every rank."""

    def __init__(self, order, n: int, seed: int):
        self.order, self.n, self.seed, self.epoch = order, n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.order(self.n, torch.Generator().manual_seed(self.seed + self.epoch)))


def random_order(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def length_grouped_order(lengths, batch_size: int):
    """transformers' length grouping (get_length_grouped_indices): shuffle, sort megabatches by
    length, longest batch first; the same indices for the same generator, vectorised."""
    lengths = np.asarray(lengths)
    return lambda n, generator: length_grouped_indices(lengths, batch_size, generator)


def length_grouped_indices(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> list[int]:
    """A random permutation cut into megabatches of up to 50 batches, each sorted longest first
    (stable, as Python's sorted(reverse=True) is), then the longest pair of all swapped to the
    front, so an out-of-memory error comes at the first step. transformers sorts each megabatch
    in Python: 0.6 s per epoch for a million pairs, where this takes 0.2 s."""
    n = len(lengths)
    if n == 0:
        return []
    size = max(min(n // (batch_size * 4), 50), 1) * batch_size
    shuffled = torch.randperm(n, generator=generator).numpy()
    order = shuffled[np.lexsort((-lengths[shuffled], np.arange(n) // size))]  # by megabatch, then longest first
    longest = (
        int(np.argmax(lengths[order[::size]])) * size
    )  # the first element of the megabatch holding the longest pair
    order[0], order[longest] = order[longest], order[0]
    return order.tolist()


def pair_lengths(dataset) -> np.ndarray:
    """max(chosen_len, rejected_len) per pair. For the cache's own memory-mapped table, its two
    int32 columns are read as Arrow (20 ms for a million pairs, where datasets' numpy formatter
    takes 0.5-1.3 s); a dataset with an index mapping (select, shuffle) goes through the formatter."""
    if getattr(dataset, "_indices", None) is None:
        table = dataset.with_format("arrow", columns=["chosen_len", "rejected_len"])[:]
        return np.maximum(table["chosen_len"].to_numpy(), table["rejected_len"].to_numpy())
    columns = dataset.with_format("numpy", columns=["chosen_len", "rejected_len"])[:]
    return np.maximum(columns["chosen_len"], columns["rejected_len"])
