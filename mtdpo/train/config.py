"""Every option of `mtdpo train`: transformers' TrainingArguments plus the DPO ones.

One dataclass, parsed by TRL's TrlParser, so each field can be set in a YAML file
(`--config configs/X.yaml`) and overridden on the command line (`--learning-rate 1e-6`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

from mtdpo.errors import UsageError
from mtdpo.train.kto_loss import KTO_LOSS_TYPES, NEEDS_KL
from mtdpo.train.loss import LOSS_TYPES, NLL_NORMS, REFERENCE_FREE


@dataclass
class MtdpoConfig(TrainingArguments):
    data: list[str] = field(
        default_factory=list, metadata={"help": "Cache directory (or several) written by `mtdpo preprocess`."}
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "Policy model name or path. [default: a tiny random Gemma-architecture model (offline demo)]"
        },
    )
    ref_model: str | None = field(
        default=None, metadata={"help": "Frozen reference model. [default: a copy of --model as loaded]"}
    )
    beta: float = field(
        default=0.1, metadata={"help": "DPO temperature: larger keeps the policy closer to the reference."}
    )
    nll_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the NLL term on chosen tokens (KTO: on desirable rows). 0: plain DPO / KTO. "
            "[default: 1.0 with a pair loss (the math-agent recipe), 0 with kto and apo_zero_unpaired (M-KTO and TRL add none)]"
        },
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "Pair caches: sigmoid (DPO), ipo, hinge, robust, sigmoid_norm (length-normalised), "
            "simpo (no reference model; wants --beta 2-10), apo_zero, bco_pair. "
            "KTO caches: kto (with TRL's KL reference point), apo_zero_unpaired."
        },
    )
    desirable_weight: float = field(
        default=1.0, metadata={"help": "KTO: weight of the desirable rows' losses (the paper's lambda_D)."}
    )
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "KTO: weight of the undesirable rows' losses (the paper's lambda_U)."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Assumed label noise, in [0, 0.5), for sigmoid (cDPO), sigmoid_norm, simpo, robust."},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin."})
    nll_norm: str = field(
        default="token",
        metadata={
            "help": "token: NLL over all trained chosen tokens; sequence: mean of each chosen sequence's NLL per token."
        },
    )
    loss_scope: str = field(
        # step: DPO = mean over the step's pairs, NLL over its trained chosen tokens, all micro-batches and ranks
        # together, so batch x accumulation x ranks never changes the update (docs/FAQ.md).
        default="step",
        metadata={
            "help": "step: means over the whole optimizer step; micro_batch: per micro-batch (the original recipe)."
        },
    )
    eval_data: str | None = field(default=None, metadata={"help": "A second cache to evaluate on."})
    allow_mismatch: bool = field(
        default=False,
        metadata={"help": "Train even if the model's tokenizer differs from the one the cache was made with."},
    )
    verify_cache: bool = field(
        default=False,
        metadata={"help": "SHA-256 every shard first, not only changed ones (~1 s/GB)."},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})
    padding_free: bool = field(
        default=False,
        metadata={"help": "One row per batch, no padding (else padded, said at start)."},
    )
    prefix_sharing: bool | None = field(
        default=None,
        metadata={
            "help": "A pair as one sequence: the shared prompt is computed once, same losses. [default: on where sdpa fits]"
        },
    )
    prefix_forest: bool = field(
        default=False,
        metadata={"help": "A micro-batch as a forest: every prefix its sequences share computed once; same losses."},
    )
    group_by_prompt: bool | None = field(
        default=None,
        metadata={
            "help": "Keep the pairs (or KTO rows) of one problem (the same messages before the first assistant turn) in one micro-batch (what a forest shares). "
            "[default: on with --prefix-forest]"
        },
    )
    max_tokens_per_batch: int = field(
        default=0,
        metadata={
            "help": "Forest tokens per micro-batch at most (a prompt counted once), beside the pairs (rows) per batch; "
            "0: no limit."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model code from the model's repository to run (off: only transformers' own)."},
    )
    skip_nonfinite: bool = field(
        default=False,
        metadata={
            "help": "Skip an optimizer step whose loss or gradient is NaN or infinite (no weight moves; logged as skipped), instead of stopping."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank: > 0 trains peft LoRA adapters only; the reference is the model with its adapters off (no second copy). 0: full fine-tune."
        },
    )
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA scale numerator: adapter updates are scaled by alpha / r."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA adapters' input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Layers that get adapters: all-linear (every linear layer of attention and MLP) or names, e.g. q_proj,v_proj."
        },
    )
    merge_adapters: bool = field(
        default=False,
        metadata={
            "help": "Also write the adapters merged into the weights (output dir, loads with AutoModelForCausalLM); the adapters go to <output dir>/adapter."
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load --model in 4-bit NF4 (CUDA GPU and the qlora extra only); needs --lora-r."},
    )
    # TrainingArguments whose defaults differ for DPO
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bfloat16 mixed precision (losses summed in fp32). --no-bf16: fp32. "
            "[default: on for GPUs and for CPUs with bf16 matmul (AMX, avx512_bf16), fp32 elsewhere]"
        },
    )
    output_dir: str = field(default="runs/mtdpo", metadata={"help": "Checkpoints, final model, metrics.jsonl."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an --output-dir that holds another run's checkpoints, removing them."},
    )
    resume_new_length: bool = field(
        default=False,
        metadata={
            "help": "Resume with another --max-steps / --num-train-epochs than the checkpoint's (the schedule is stretched to it)."
        },
    )
    learning_rate: float = field(
        default=1e-6, metadata={"help": "Peak learning rate (the paper's Gemma recipe: 4e-7)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "group_by_length (pairs of similar length together: less padding), random, sequential."},
    )
    disable_tqdm: bool = field(
        default=True, metadata={"help": "Hide the tqdm bar (mtdpo prints a line per logging step)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the cache's columns (the collator needs them)."}
    )

    def __post_init__(self):
        # Decided here, before TrainingArguments checks it against the device (and before it lets
        # --bf16 override the launcher's ACCELERATE_MIXED_PRECISION, or the launcher's bf16 a --no-bf16).
        self.bf16, self.precision_note = choose_bf16(self.bf16, launcher_precision(), self.use_cpu)
        if self.bf16 and not self.use_cpu and not _has_accelerator():
            self.use_cpu = True  # where training runs anyway; TrainingArguments wants it said for CPU bf16
        with library_output_to_stderr():  # device setup: DeepSpeed builds and announces its ops here
            super().__post_init__()
        if self.nll_coef is None:  # M-KTO (the paper's code) and TRL's KTOTrainer add no NLL term
            self.nll_coef = 0.0 if self.loss_type in KTO_LOSS_TYPES else 1.0
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError("--data is required: a cache directory written by `mtdpo preprocess`")
        if self.dataloader_pin_memory and (self.use_cpu or not torch.cuda.is_available()):
            self.dataloader_pin_memory = False  # pinning needs an accelerator: torch warns on every run otherwise
        self.check()

    def check(self) -> None:
        """Options that cannot work together, refused in one line before anything is loaded."""
        if self.loss_type not in LOSS_TYPES + KTO_LOSS_TYPES:
            known = f"{', '.join(LOSS_TYPES)} (pair caches) or {', '.join(KTO_LOSS_TYPES)} (KTO caches)"
            raise UsageError(f"unknown --loss-type {self.loss_type!r}; use one of {known}")
        if self.loss_type in NEEDS_KL and self.per_device_train_batch_size < 2:
            raise UsageError(
                f"--loss-type {self.loss_type} needs --per-device-train-batch-size 2 or more: with 1, each row's KL "
                "partner is the row itself and the reference point its own reward (TRL refuses it too); "
                "raise it, lowering --gradient-accumulation-steps for the same step"
            )
        for flag, weight in (
            ("--desirable-weight", self.desirable_weight),
            ("--undesirable-weight", self.undesirable_weight),
        ):
            if not weight > 0:
                raise UsageError(f"{flag} {weight}: a KTO class weight is a positive number")
        if self.nll_norm not in NLL_NORMS:
            raise UsageError(f"unknown --nll-norm {self.nll_norm!r}; use one of {', '.join(NLL_NORMS)}")
        if self.loss_scope not in ("step", "micro_batch"):
            raise UsageError(f"unknown --loss-scope {self.loss_scope!r}; use step or micro_batch")
        if self.loss_type in REFERENCE_FREE and self.ref_model:
            raise UsageError(
                f"--loss-type {self.loss_type} is reference-free: it never uses --ref-model {self.ref_model}; drop one of them"
            )
        if self.group_by_prompt is None:
            self.group_by_prompt = self.prefix_forest
        if self.max_tokens_per_batch < 0:
            raise UsageError(
                f"--max-tokens-per-batch {self.max_tokens_per_batch}: a number of tokens, or 0 for no limit"
            )
        if (self.group_by_prompt or self.max_tokens_per_batch) and self.loss_scope != "step":
            raise UsageError(
                "--group-by-prompt and --max-tokens-per-batch make micro-batches of varying sizes: they need "
                "--loss-scope step (the loss is the mean over the step's pairs, whatever each micro-batch holds)"
            )
        if self.lora_r < 0:
            raise UsageError(f"--lora-r {self.lora_r}: the LoRA rank is a positive number (0 = full fine-tune)")
        if self.lora_r == 0:
            for flag, value in (("--merge-adapters", self.merge_adapters), ("--load-in-4bit", self.load_in_4bit)):
                if value:
                    raise UsageError(f"{flag} needs LoRA adapters: pass --lora-r (e.g. 16)")
        if self.lora_r > 0 and self.model is None and is_deepspeed_zero3_enabled():
            raise UsageError(
                "LoRA with ZeRO-3 needs a saved --model: ZeRO-3 builds the random default model shard by shard"
            )


def cpu_has_bf16_matmul() -> str | None:
    """The CPU flag that makes bf16 matmuls fast (AMX tiles, or AVX-512 BF16), if any."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:  # not Linux
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def _has_accelerator() -> bool:
    import torch

    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
    )


@contextlib.contextmanager
def library_output_to_stderr():
    """stdout carries mtdpo's lines (the plan, one line per logging step); what libraries print
    meanwhile (DeepSpeed's "... built successfully" on every rank, its logger's warnings) goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
    if "deepspeed" in sys.modules:  # DeepSpeed's logger writes to stdout
        for handler in logging.getLogger("DeepSpeed").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)


def launcher_precision() -> str | None:
    """The precision `accelerate launch` chose (its --mixed_precision flag or config file; "no"
    when neither says), or None outside accelerate launch."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION")


def choose_bf16(flag: bool | None, launcher: str | None, use_cpu: bool) -> tuple[bool, str]:
    """bf16 or fp32, and why: the launcher's choice wins over the automatic one; a --bf16 or
    --no-bf16 that contradicts it is refused (accelerate would autocast one way, mtdpo report the other)."""
    if launcher is not None and launcher not in ("no", "bf16"):
        raise UsageError(
            f"accelerate launch set mixed_precision {launcher}: mtdpo trains in bf16 or fp32; launch with "
            "--mixed_precision bf16 or no"
        )
    if flag is None:
        if launcher is None:
            return auto_bf16(use_cpu)
        return launcher == "bf16", f"set by accelerate launch: mixed_precision {launcher}"
    if launcher is not None and flag != (launcher == "bf16"):
        option, wanted = ("--bf16", "bf16") if flag else ("--no-bf16", "no")
        raise UsageError(
            f"{option} contradicts accelerate launch's mixed_precision {launcher} (its --mixed_precision or config "
            f"file): drop {option} (the launcher decides), or launch with --mixed_precision {wanted}"
        )
    return flag, "set by --bf16" if flag else "set by --no-bf16"


def auto_bf16(use_cpu: bool) -> tuple[bool, str]:
    """bf16 where the hardware computes it fast, fp32 elsewhere, and why (printed at start)."""
    import torch

    if not use_cpu and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return True, f"auto: {torch.cuda.get_device_name()} has bf16"
        return False, f"auto: {torch.cuda.get_device_name()} has no bf16"
    if not use_cpu and _has_accelerator():
        return False, "auto: no bf16 rule for this accelerator, --bf16 turns it on"
    flag = cpu_has_bf16_matmul()
    return (
        (True, f"auto: this CPU has bf16 matmul ({flag})")
        if flag
        else (False, "auto: this CPU has no bf16 matmul (AMX, avx512_bf16)")
    )


# Options that default to "auto" (None): a bare flag turns them on, --no-X off.
TRISTATE_FLAGS = ("--bf16", "--prefix-sharing", "--prefix_sharing")


def _tristate(argv: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        negated = arg.replace("--no-", "--", 1).replace("--no_", "--", 1)
        if arg.startswith("--no") and negated in TRISTATE_FLAGS:
            out += [negated, "false"]
        elif arg in TRISTATE_FLAGS and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out += [arg, "true"]
        else:
            out.append(arg)
    return out


def parse_train_args(argv: list[str]) -> MtdpoConfig:
    """`--config FILE.yaml` sets defaults, then command-line flags override them."""
    from trl import TrlParser

    description = (
        "Train with multi-turn DPO + NLL on mtdpo caches. --config FILE.yaml sets any option below "
        "(YAML keys are the option names with underscores); flags on the command line override it."
    )
    argv = _tristate(argv)
    parser = TrlParser(
        [MtdpoConfig], prog="mtdpo train", description=description, allow_abbrev=False
    )  # --learning_rat is a typo, not --learning_rate
    (config,) = parser.parse_args_and_config(argv)
    return config
