"""`mtdpo train --help`: mtdpo's own options first, grouped, then a pointer to the rest.

`mtdpo train` takes every transformers TrainingArguments field (over 400 options). Their raw
argparse listing buries the dozen that matter for DPO, so the short help shows those, grouped,
in the style of the other commands; `--help-all` prints the full listing.
"""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

# Every option MtdpoConfig adds to TrainingArguments sits in one group (a test checks it), plus
# the TrainingArguments a DPO run most often sets.
OPTION_GROUPS = {
    "Data": ("data", "eval_data", "allow_mismatch", "verify_cache", "train_sampling_strategy"),
    "Objective": (
        "beta",
        "nll_coef",
        "nll_norm",
        "loss_scope",
        "loss_type",
        "label_smoothing",
        "simpo_gamma",
    ),
    "Reference": ("ref_model",),
    "Model": ("model", "attn_implementation", "prefix_sharing", "prefix_forest", "padding_free", "trust_remote_code"),
    "Run": (
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "group_by_prompt",
        "max_tokens_per_batch",
        "bf16",
        "activation_checkpointing",
        "seed",
        "skip_nonfinite",
        "resume_from_checkpoint",
        "resume_new_length",
    ),
    "KTO (on KTO caches)": ("desirable_weight", "undesirable_weight"),
    "LoRA": ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_adapters", "load_in_4bit"),
    "Output": (
        "output_dir",
        "overwrite_output_dir",
        "logging_steps",
        "eval_strategy",
        "eval_steps",
        "save_steps",
        "report_to",
    ),
}
# TrainingArguments' own help runs to several lines each: one line here (`--help-all` has theirs).
SHORT_HELP = {
    "nll_coef": "NLL weight on chosen tokens (KTO: desirable rows). [default: 1.0; 0 with a KTO loss]",
    "nll_norm": "token: over all trained chosen tokens; sequence: per conversation.",
    "loss_scope": "step: means over the optimizer step; micro_batch: per micro-batch.",
    "loss_type": "sigmoid, ipo, hinge, robust, sigmoid_norm, simpo, apo_zero, bco_pair; "
    "KTO caches: kto, apo_zero_unpaired.",
    "desirable_weight": "KTO: weight of the desirable rows.",
    "undesirable_weight": "KTO: weight of the undesirable rows.",
    "data": "Caches from `mtdpo preprocess` (or globs).",
    "train_sampling_strategy": "group_by_length (less padding), random, sequential.",
    "allow_mismatch": "Train even if the model's tokenizer differs from the cache's.",
    "num_train_epochs": "Passes over the data.",
    "max_steps": "Optimizer steps to run; overrides --num-train-epochs when > 0.",
    "per_device_train_batch_size": "Pairs (KTO: rows) per batch on each device; for KTO it also fixes each row's KL partner (TRL's rule), so precompute-ref needs the run's.",
    "per_device_eval_batch_size": "Pairs per forward pass in evaluation and precompute-ref.",
    "gradient_accumulation_steps": "Batches per optimizer step (the update equals one batch this many times larger).",
    "bf16": "bfloat16 mixed precision; --no-bf16: fp32. [default: where the hardware has it: GPU, CPU with AMX or avx512_bf16]",
    "activation_checkpointing": "Recompute activations in the backward pass: less memory, ~20% slower. Alias: --gradient-checkpointing.",
    "seed": "Seed for the data order and the tiny default model.",
    "resume_from_checkpoint": "A checkpoint directory, or `auto` for the newest complete one in --output-dir.",
    "resume_new_length": "Resume with another --max-steps / --num-train-epochs than the checkpoint's.",
    "overwrite_output_dir": "Start afresh in an --output-dir holding another run's checkpoints (removed).",
    "eval_strategy": "When to evaluate on --eval-data: no, steps or epoch.",
    "eval_steps": "Evaluate every N steps (with --eval-strategy steps); default: --logging-steps.",
    "save_steps": "Save a checkpoint every N steps.",
    "report_to": "Loggers: none, tensorboard, wandb, all …",
}


def print_help(console: Console | None = None) -> None:
    from mtdpo.train.config import MtdpoConfig

    console = console or Console()
    fields = {f.name: f for f in dataclasses.fields(MtdpoConfig)}
    console.print("\n Usage: mtdpo train --data CACHE [CACHE ...] [OPTIONS]\n")
    console.print(
        " Train with multi-turn DPO + NLL on caches written by `mtdpo preprocess`.\n"
        " [bold]--config FILE.yaml[/] sets any option (YAML keys are the names with underscores);\n"
        " flags on the command line override it.\n",
        highlight=False,
    )
    for group, names in OPTION_GROUPS.items():
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for name in names:
            table.add_row(f"--{name.replace('_', '-')}", escape(_describe(fields[name])))
        console.print(Panel(table, title=group, title_align="left", border_style="dim"))
    console.print(
        " … and every other transformers TrainingArguments option (--warmup-steps, --weight-decay,\n"
        " --deepspeed, --fsdp …): [bold]mtdpo train --help-all[/] lists them all.",
        highlight=False,
    )


# The train options that decide a reference's log-probs: precompute-ref reads the same ones, so
# the same flags or YAML give the same reference, layout and precision as the training run.
PRECOMPUTE_OPTIONS = (
    "model",
    "ref_model",
    "seed",
    "bf16",
    "attn_implementation",
    "prefix_sharing",
    "padding_free",
    "per_device_eval_batch_size",
    "per_device_train_batch_size",
    "allow_mismatch",
    "trust_remote_code",
    "verify_cache",
)


def print_precompute_help(console: Console | None = None) -> None:
    from mtdpo.train.config import MtdpoConfig

    console = console or Console()
    fields = {f.name: f for f in dataclasses.fields(MtdpoConfig)}
    console.print("\n Usage: mtdpo precompute-ref CACHE [OPTIONS]\n")
    console.print(
        " Store the reference model's log-probs in CACHE (beside its token shards); training then loads\n"
        " no reference model. The reference is --ref-model, by default --model (the tiny random model of\n"
        " --seed when neither is given). Give the options of the training run, or its [bold]--config FILE.yaml[/]:\n"
        " the log-probs are computed with its layout and precision, so training starts from a tie.\n",
        highlight=False,
    )
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for name in PRECOMPUTE_OPTIONS:
        flag = f"--{name.replace('_', '-')}" + (" (--batch-size)" if name == "per_device_eval_batch_size" else "")
        table.add_row(flag, escape(_describe(fields[name])))
    table.add_row("-q, --quiet", "No progress (loading, fingerprinting, the forward passes) on stderr. [default: off]")
    console.print(Panel(table, title="Options (those of `mtdpo train`)", title_align="left", border_style="dim"))


def _describe(field: dataclasses.Field) -> str:
    text = SHORT_HELP.get(field.name) or " ".join(str(field.metadata.get("help", "")).split())
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if "[default:" in text:
        return text
    return f"{text} [default: {_show(default)}]"


def _show(value) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(getattr(value, "value", value))  # enums (eval_strategy …) show their value
