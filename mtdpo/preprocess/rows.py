"""Turn one raw input row into a validated preference pair of full conversations.

Two row shapes are accepted (DESIGN.md, "Input"):
  {"chosen": [msgs], "rejected": [msgs]}                 full conversations (RLHFlow style)
  {"prompt": [msgs] | str, "chosen": [msgs] | str, "rejected": [msgs] | str}   TRL style
Either way the shared prompt is the longest common prefix of whole messages of the two
full conversations, so both shapes mask the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool", "observation", "ipython", "function")


class RowError(ValueError):
    """A row that cannot be used. The message is the reason written to rejects.jsonl."""


@dataclass(frozen=True)
class Pair:
    chosen: list[dict]  # full conversation, prompt included
    rejected: list[dict]
    n_prompt: int  # leading messages shared by both sides


def to_pair(row: object) -> Pair:
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, expected a JSON object")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(f"missing key '{key}' (row keys: {sorted(row)})")
    # A null prompt is no prompt: parquet/arrow inputs give rows without one `prompt: None`.
    prompt = _messages(row["prompt"], "prompt", "user") if row.get("prompt") is not None else []
    chosen = prompt + _messages(row["chosen"], "chosen", "assistant")
    rejected = prompt + _messages(row["rejected"], "rejected", "assistant")
    if not chosen or not rejected:
        raise RowError("empty conversation: chosen or rejected has no messages")
    if chosen == rejected:
        raise RowError("chosen and rejected are identical")
    n_prompt = shared_prefix_length(chosen, rejected)
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in msgs[n_prompt:]):
            raise RowError(f"{side} has no assistant message after the shared prompt ({n_prompt} messages)")
    return Pair(chosen, rejected, n_prompt)


def shared_prefix_length(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _messages(value: object, side: str, shorthand_role: str) -> list[dict]:
    """Validate a list of messages, or expand a string shorthand into one message."""
    if isinstance(value, str):
        return [{"role": shorthand_role, "content": value}]
    if not isinstance(value, list):
        raise RowError(f"{side} is a {type(value).__name__}, expected a list of messages or a string")
    return [_message(m, f"{side}[{i}]") for i, m in enumerate(value)]


def _message(msg: object, where: str) -> dict:
    if not isinstance(msg, dict):
        raise RowError(f"{where} is a {type(msg).__name__}, expected an object with 'role' and 'content'")
    role, content = msg.get("role"), msg.get("content")
    if "role" not in msg:
        raise RowError(f"{where} has no 'role'")
    if role not in ROLES:
        raise RowError(f"{where} has unknown role {role!r} (known: {', '.join(ROLES)})")
    if "content" not in msg:
        raise RowError(f"{where} ({role}) has no 'content'")
    if not isinstance(content, str):
        if content is None:
            shown = "null"
        elif isinstance(content, float) and math.isnan(content):
            shown = "NaN"
        else:
            shown = f"a {type(content).__name__}"
        raise RowError(f"{where} ({role}) content is {shown}, expected a string")
    # Keep extra keys (tool_calls, name …): a template may render them.
    return dict(msg)
