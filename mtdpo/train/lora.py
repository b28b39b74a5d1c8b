"""LoRA through peft: adapters on the policy, the reference as the adapters switched off, and
what a run leaves on disk.

    <output dir>/                adapter_config.json + adapter_model.safetensors: loads with
                                 peft's AutoPeftModelForCausalLM (and the tokenizer)
    <output dir>/base-model/     the tiny random default model, when no --model was given, so
                                 that the adapters have a base to load onto
    --merge-adapters:            the merged model in <output dir> (AutoModelForCausalLM), the
                                 adapters in <output dir>/adapter/
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from mtdpo import compat
from mtdpo.errors import UsageError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def qlora_config() -> dict:
    """from_pretrained arguments for QLoRA: 4-bit NormalFloat base weights with bf16 compute
    (Dettmers et al. 2023, arXiv 2305.14314), loaded onto this rank's GPU."""
    if not torch.cuda.is_available():
        raise UsageError("--load-in-4bit (QLoRA) runs on a CUDA GPU only; on this machine use LoRA without it")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--load-in-4bit needs bitsandbytes: pip install 'mtdpo[qlora]'")
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": quantization, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def add_lora(model, r: int, alpha: float, dropout: float, target_modules: str, gradient_checkpointing: bool = False):
    """Wrap `model` in fresh LoRA adapters (peft); only the adapters train.

    target_modules: "all-linear" (every linear layer of attention and MLP, not the LM head) or
    comma-separated module names such as "q_proj,v_proj".
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = (
        "all-linear"
        if target_modules.strip() == "all-linear"
        else [m.strip() for m in target_modules.split(",") if m.strip()]
    )
    if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: norms in fp32, inputs that carry gradients
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as err:  # e.g. "Target modules {'qproj'} not found in the base model"
        raise UsageError(f"--lora-target-modules {target_modules}: {str(err).splitlines()[0]}") from None
    if gradient_checkpointing:  # checkpointed blocks need inputs that carry gradients when the embeddings are frozen
        model.enable_input_require_grads()
    return model


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapters_disabled(model):
    """The reference of a LoRA policy: the same weights with the adapters switched off."""
    return model.disable_adapter()


def finish_adapters(output_dir: Path, base: str, merge: bool, dtype: torch.dtype) -> None:
    """After Trainer.save_model wrote the adapters to output_dir (main process only)."""
    point_adapters_at(output_dir, str(Path(base).resolve()) if Path(base).exists() else base)
    if merge:
        merge_saved_adapters(output_dir, base, dtype)


def point_adapters_at(adapter_dir: Path, base: str) -> None:
    """Record the base model the adapters load onto (peft writes the model's name_or_path,
    empty for a model built from a config)."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2) + "\n")


def merge_saved_adapters(output_dir: Path, base: str, dtype: torch.dtype) -> None:
    """Move the saved adapters to <output_dir>/adapter and write base + adapters merged into
    <output_dir>. Reads the files just saved, so it works after DDP, ZeRO-2/3 and FSDP alike
    (a QLoRA run merges into the unquantized base, in bf16)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output_dir = Path(output_dir)
    adapter_dir = output_dir / "adapter"
    adapter_dir.mkdir(exist_ok=True)
    for name in ADAPTER_FILES:
        if (output_dir / name).exists():
            shutil.move(str(output_dir / name), adapter_dir / name)
    with compat.zero3_off():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(output_dir))
