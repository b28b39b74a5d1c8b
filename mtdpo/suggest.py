""" "Did you mean …?" for `mtdpo train`, whose options argparse parses.

typer already suggests the closest command or option for the other commands; argparse (through
TRL's parser) only lists what it did not understand, so the closest option names are added here.
"""

from __future__ import annotations

import difflib
import re

UNKNOWN_CLI = "Some specified arguments are not used by the HfArgumentParser"
UNKNOWN_YAML = "Unknown arguments from config file"


def explain_unknown_options(message: str, names: list[str]) -> str:
    """Rewrite TRL's unknown-option messages with the closest known option for each."""
    for prefix, what, dash in (
        (UNKNOWN_CLI, "unknown option", "--"),
        (UNKNOWN_YAML, "unknown key in the config file", ""),
    ):
        if message.startswith(prefix):
            unknown = re.findall(r"'--([A-Za-z0-9_.-]+)", message)
            return f"{what}{'s' if len(unknown) > 1 else ''}: " + ", ".join(_with_hint(u, names, dash) for u in unknown)
    return message


def _with_hint(given: str, names: list[str], dash: str) -> str:
    name = given.split("=", 1)[0]
    shown = dash + (name if dash else name.replace("-", "_"))
    match = closest(name, names)
    return f"{shown} (did you mean {dash}{match.replace('_', '-') if dash else match}?)" if match else shown


def closest(name: str, names: list[str]) -> str | None:
    matches = difflib.get_close_matches(name.replace("-", "_"), names, n=1, cutoff=0.6)
    return matches[0] if matches else None
