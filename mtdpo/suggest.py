""" "Did you mean …?" for `mtdpo train`, whose options argparse parses.

typer already suggests the closest command or option for the other commands; argparse (through
TRL's parser) only lists what it did not understand, so this names each piece: the closest option
for a typo, mtdpo's name (or where the setting went) for a TRL one, and the option a stray value
followed.
"""

from __future__ import annotations

import ast
import difflib
import re

UNKNOWN_CLI = "Some specified arguments are not used by the HfArgumentParser"
UNKNOWN_YAML = "Unknown arguments from config file"

# TRL's DPOConfig / ModelConfig / ScriptArguments names that mtdpo spells differently or sets
# elsewhere: name -> (mtdpo's option, or None, and what to say). Checked before the closest-name
# guess, which would match rpo_alpha to lora_alpha.
CUT_AT_PREPROCESS = "sequences are cut when the cache is made: `mtdpo preprocess --max-length N`"
TRL_NAMES: dict[str, tuple[str | None, str]] = {
    "rpo_alpha": ("nll_coef", "the weight of the NLL term on chosen tokens"),
    "model_name_or_path": ("model", ""),
    "max_length": (None, CUT_AT_PREPROCESS),
    "max_prompt_length": (None, f"{CUT_AT_PREPROCESS}, keeping the whole prompt and cutting the tail"),
    "max_completion_length": (None, f"{CUT_AT_PREPROCESS}, keeping the whole prompt and cutting the tail"),
    "truncation_mode": (None, f"{CUT_AT_PREPROCESS}, keeping the start"),
    "dataset_name": (None, "make a cache first, `mtdpo preprocess NAME`, then pass it with --data"),
    "dataset_train_split": (None, "`mtdpo preprocess NAME --split SPLIT` picks it when the cache is made"),
    "dataset_test_split": (None, "make a cache of that split, then pass it with --eval-data"),
    "dataset_num_proc": (None, "`mtdpo preprocess --num-proc N`"),
    "chat_template_path": (None, "`mtdpo preprocess --chat-template FILE`"),
    "use_peft": ("lora_r", "a rank above 0 turns LoRA on, e.g. 16"),
    "precompute_ref_log_probs": (None, "run `mtdpo precompute-ref CACHE` before training"),
    "dtype": ("bf16", "mtdpo keeps fp32 weights and trains in bf16 mixed precision with it"),
    "torch_dtype": ("bf16", "mtdpo keeps fp32 weights and trains in bf16 mixed precision with it"),
}


def explain_unknown_options(message: str, names: list[str], argv: list[str] = ()) -> str:
    """Rewrite TRL's unknown-argument messages: each unknown option with mtdpo's name for it or
    the closest known one, each stray value with the option it followed (`argv`: the arguments)."""
    for prefix, noun, where, dash in (
        (UNKNOWN_CLI, "option", "", "--"),
        (UNKNOWN_YAML, "key", " in the config file", ""),
    ):
        if message.startswith(prefix):
            options, strays = _options_and_strays(_listed(message))
            plural = "s" if len(options) > 1 else ""
            hints = ", ".join(_with_hint(option, names, dash) for option in options)
            parts = [f"unknown {noun}{plural}{where}: {hints}"] if options else []
            return "; ".join(parts + ([_stray(strays, list(argv))] if strays else []))
    return message


def _listed(message: str) -> list[str]:
    """The arguments TRL's message lists (a Python list of strings)."""
    try:
        return [str(item) for item in ast.literal_eval(message[message.index("[") : message.rindex("]") + 1])]
    except (ValueError, SyntaxError):
        return [f"--{name}" for name in re.findall(r"'--([A-Za-z0-9_.-]+)", message)]


def _options_and_strays(unknown: list[str]) -> tuple[list[str], list[str]]:
    """Unknown options (`--name`, `--name=value`), and the values that follow no unknown option."""
    options, strays = [], []
    for k, item in enumerate(unknown):
        if item.startswith("--"):
            options.append(item[2:])
        elif k == 0 or not unknown[k - 1].startswith("--") or "=" in unknown[k - 1]:
            strays.append(item)
    return options, strays


def _stray(strays: list[str], argv: list[str]) -> str:
    shown = ", ".join(repr(s) for s in strays)
    what = f"unexpected argument{'s' if len(strays) > 1 else ''} {shown}"
    at = max((k for k, arg in enumerate(argv) if arg == strays[0]), default=None)
    option = next((j for j in range(at - 1, -1, -1) if argv[j].startswith("-")), None) if at else None
    if option is None:
        return f"{what}: options come as --name VALUE (caches: --data CACHE [CACHE ...])"
    given = " ".join(argv[option : option + 2])
    return f"{what} after {given}: {argv[option]} takes one value (only --data takes several)"


def _with_hint(given: str, names: list[str], dash: str) -> str:
    name = given.split("=", 1)[0]
    shown = dash + (name if dash else name.replace("-", "_"))
    spelled = (lambda option: dash + option.replace("_", "-")) if dash else (lambda option: option)
    trl = TRL_NAMES.get(name.replace("-", "_"))
    if trl is not None:
        option, note = trl
        if option is None:
            return f"{shown} (TRL's: {note})"
        return f"{shown} (TRL's name; mtdpo's is {spelled(option)}{': ' + note if note else ''})"
    match = closest(name, names)
    return f"{shown} (did you mean {spelled(match)}?)" if match else shown


def closest(name: str, names: list[str]) -> str | None:
    matches = difflib.get_close_matches(name.replace("-", "_"), names, n=1, cutoff=0.6)
    return matches[0] if matches else None
