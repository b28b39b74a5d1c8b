"""What a run will do, decided once from its options, its caches and the model's config, before a
model is loaded: where reference log-probs come from, the batch layout, the precision.

`run.train` executes the plan and the trainer reads it; `precompute-ref` makes the same plan,
so its log-probs come from the layout and precision the run will train with.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mtdpo.cache import OpenCache
from mtdpo.cache.schema import KIND_NAMES
from mtdpo.errors import UsageError
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.kto_loss import KTO_LOSS_TYPES, NEEDS_KL
from mtdpo.train.layout import Layout, choose_layout
from mtdpo.train.loss import LOSS_TYPES, REFERENCE_FREE
from mtdpo.train.provenance import check_provenance


class Reference(Enum):
    """Where a batch's reference log-probs come from (the value is what the run says at start)."""

    NONE = "none (reference-free loss)"
    COLUMNS = "precomputed log-probs in the cache"
    ADAPTERS_OFF = "the policy with its LoRA adapters off"
    COPY = "a frozen copy of the policy"
    MODEL = "--ref-model"

    @property
    def is_model(self) -> bool:
        """A model (beside the policy) computes it: loaded once, kept frozen."""
        return self in (Reference.COPY, Reference.MODEL)


@dataclass(frozen=True)
class Plan:
    reference: Reference  # for training batches
    eval_reference: Reference | None  # for evaluation batches (None: no eval data)
    layout: Layout
    bf16: bool
    precision_note: str  # why this precision (printed at start)
    lora: bool
    activation_checkpointing: bool

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def loads_reference_model(self) -> bool:
        return self.reference.is_model or (self.eval_reference is not None and self.eval_reference.is_model)

    def describe(self) -> str:
        """The run's first line: what it computes, and with what."""
        reference = self.reference.value
        if self.eval_reference not in (None, self.reference):
            reference += f" (eval: {self.eval_reference.value})"
        lora = "LoRA adapters" if self.lora else "full fine-tune"
        checkpointing = (
            "activation checkpointing on" if self.activation_checkpointing else "activation checkpointing off"
        )
        return (
            f"precision: {self.precision} ({self.precision_note}); reference: {reference}; "
            f"{self.layout.note}; {lora}; {checkpointing}"
        )


def make_plan(config: MtdpoConfig, train: OpenCache, evaluation: OpenCache | None, model_config) -> Plan:
    """Decide, in one place, and refuse what cannot work in one line."""
    check_loss_fits(config, train, evaluation)
    layout = layout_for(config, train, model_config)
    plan = Plan(
        reference=reference_source(config, train),
        eval_reference=None if evaluation is None else reference_source(config, evaluation),
        layout=layout,
        bf16=bool(config.bf16),
        precision_note=config.precision_note,
        lora=config.lora_r > 0,
        activation_checkpointing=bool(config.activation_checkpointing),
    )
    used = [
        c for c, source in ((train, plan.reference), (evaluation, plan.eval_reference)) if source is Reference.COLUMNS
    ]
    if used:
        caches = [(str(path), manifest) for cache in used for path, manifest in zip(cache.paths, cache.manifests)]
        check_provenance(caches, config.ref_model, config.model, config.seed)
        for path, manifest in caches:
            if manifest.reference.precision != plan.precision:
                raise UsageError(
                    f"cache {path} holds reference log-probs computed in {manifest.reference.precision}, but this run "
                    f"trains in {plan.precision} ({plan.precision_note}): step 1 would not start from a tie. Re-run "
                    f"`mtdpo precompute-ref {path} {'--bf16' if plan.bf16 else '--no-bf16'}` with this run's other "
                    f"options, or train in {manifest.reference.precision}"
                )
        if train.is_kto and config.loss_type in NEEDS_KL:
            for cache in used:
                check_kl_partners(cache, config.per_device_train_batch_size)
    return plan


def check_loss_fits(config: MtdpoConfig, train: OpenCache, evaluation: OpenCache | None) -> None:
    """A pair loss on pairs, a KTO loss on KTO rows; the eval cache of the train cache's kind."""
    if evaluation is not None and evaluation.kind != train.kind:
        raise UsageError(
            f"--eval-data {evaluation.path} is {KIND_NAMES[evaluation.kind]} and --data {train.path} {KIND_NAMES[train.kind]}: "
            "evaluate on a cache of the training data's kind"
        )
    if train.is_kto and config.loss_type not in KTO_LOSS_TYPES:
        raise UsageError(
            f"{train.path} is a KTO cache (unpaired rows): --loss-type {config.loss_type} needs pairs; "
            f"use --loss-type {' or '.join(KTO_LOSS_TYPES)}"
        )
    if train.is_kto and config.nll_norm != "token":
        raise UsageError(
            "--nll-norm sequence is for pairs: KTO's NLL on desirable rows is per token (--nll-norm token)"
        )
    if not train.is_kto and config.loss_type not in LOSS_TYPES:
        raise UsageError(
            f"--loss-type {config.loss_type} needs a KTO cache (unpaired rows), and {train.path} is a pair cache; "
            "preprocess rows of {messages, label} (`mtdpo pairs --kto`) for KTO, or pick a pair loss"
        )


def layout_for(config: MtdpoConfig, train: OpenCache, model_config) -> Layout:
    """The layouts of layout.choose_layout. A KTO row is one sequence, so prefix sharing (a
    pair's two sides over one prompt) does not apply to it; the prefix forest does (the rows of
    one problem share their prompt): padded, packed with --padding-free, or a forest."""
    if train.is_kto and config.prefix_sharing:
        raise UsageError(
            "--prefix-sharing lays out pairs; a KTO row is one sequence: drop it "
            "(--prefix-forest computes the prompt the rows of one problem share once)"
        )
    sharing = False if train.is_kto else config.prefix_sharing
    return choose_layout(config.attn_implementation, sharing, config.padding_free, model_config, config.prefix_forest)


def check_kl_partners(cache: OpenCache, batch_size: int) -> None:
    """Stored KL log-probs fit this run only if its rows get the partners they were computed with:
    the same per-device batch size, and (caches trained together) each cache starting a new chunk."""
    offset = 0
    for path, manifest in zip(cache.paths, cache.manifests):
        stored = manifest.reference.kl_batch_size
        if stored != batch_size:
            raise UsageError(
                f"cache {path} holds KL log-probs of partners paired in chunks of {stored} rows (--per-device-train-batch-size "
                f"{stored}), but this run pairs in chunks of {batch_size}: re-run `mtdpo precompute-ref {path} "
                f"--per-device-train-batch-size {batch_size}`, or train with {stored}"
            )
        if offset % batch_size:
            raise UsageError(
                f"cache {path} starts at row {offset} of the joined caches, inside a chunk of {batch_size}: its rows' KL "
                "partners differ from the ones precompute-ref paired; train the caches without stored log-probs, or one at a time"
            )
        offset += manifest.pairs


def reference_source(config: MtdpoConfig, cache: OpenCache) -> Reference:
    if config.loss_type in REFERENCE_FREE:
        return Reference.NONE
    if cache.has_reference:
        return Reference.COLUMNS
    return model_reference(config)


def model_reference(config: MtdpoConfig) -> Reference:
    """The reference when no log-probs are stored: a separate model, or the policy itself."""
    if config.ref_model:
        return Reference.MODEL
    return Reference.ADAPTERS_OFF if config.lora_r > 0 else Reference.COPY
