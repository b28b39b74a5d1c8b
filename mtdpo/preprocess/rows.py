"""Turn one raw input row into a validated preference pair of full conversations.

Two row shapes are accepted (DESIGN.md, "Input"):
  {"chosen": [msgs], "rejected": [msgs]}                 full conversations (RLHFlow style)
  {"prompt": [msgs] | str, "chosen": [msgs] | str, "rejected": [msgs] | str}   TRL style
Either way the shared prompt is the longest common prefix of whole messages of the two
full conversations, so both shapes mask the same way. The sides must first differ at an
assistant message (on at least one side): a pair whose sides first differ at a user, system or
tool message on both sides answers two different prompts, which DPO cannot compare.

Every RowError message is written to rejects.jsonl as is, so it names the place (`chosen[1]`)
and says what is wrong in JSON terms (null, a number, an object), not Python's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool", "observation", "ipython", "function")
# Masking renders one prefix per message, so time grows with the square of the turns: a
# 2,000-message row takes about a minute. Longer rows are rejected, not rendered.
MAX_MESSAGES = 512


class RowError(ValueError):
    """A row that cannot be used. The message is the reason written to rejects.jsonl."""


@dataclass(frozen=True)
class Pair:
    chosen: list[dict]  # full conversation, prompt included
    rejected: list[dict]
    n_prompt: int  # leading messages shared by both sides


def to_pair(row: object) -> Pair:
    if not isinstance(row, dict):
        raise RowError(f"row is {json_type(row)}, expected a JSON object")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(f"missing key '{key}' (row keys: {sorted(row)})")
    # A null prompt is no prompt: parquet/arrow inputs give rows without one `prompt: None`.
    prompt = _messages(row["prompt"], "prompt", "user") if row.get("prompt") is not None else []
    sides = {}
    for side in ("chosen", "rejected"):
        own = _messages(row[side], side, "assistant")
        if not own:
            raise RowError(f"empty conversation: {side} has no messages" + (" after the prompt" if prompt else ""))
        sides[side] = prompt + own
        if len(sides[side]) > MAX_MESSAGES:
            raise RowError(f"{side} has {len(sides[side]):,} messages, more than the {MAX_MESSAGES} mtdpo renders per row")
    chosen, rejected = sides["chosen"], sides["rejected"]
    if chosen == rejected:
        raise RowError("chosen and rejected are identical")
    n_prompt = shared_prefix_length(chosen, rejected)
    for side, msgs in sides.items():
        if not any(m["role"] == "assistant" for m in msgs[n_prompt:]):
            raise RowError(f"{side} has no assistant message after the shared prompt ({n_prompt} messages)")
    first = {side: msgs[n_prompt]["role"] for side, msgs in sides.items()}
    if "assistant" not in first.values():
        raise RowError(
            f"the sides disagree on the prompt: they first differ at message {n_prompt} "
            f"({first['chosen']} in chosen, {first['rejected']} in rejected), not at an assistant message"
        )
    return Pair(chosen, rejected, n_prompt)


def shared_prefix_length(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def json_type(value: object) -> str:
    """What a value is, in the words of JSON: 'null', 'a number', 'an object' …"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity"
    names = {int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), f"a {type(value).__name__}")


def _messages(value: object, side: str, shorthand_role: str) -> list[dict]:
    """Validate a list of messages, or expand a string shorthand into one message."""
    if isinstance(value, str):
        return [_message({"role": shorthand_role, "content": value}, side)]
    if not isinstance(value, list):
        raise RowError(f"{side} is {json_type(value)}, expected a list of messages or a string")
    return [_message(m, f"{side}[{i}]") for i, m in enumerate(value)]


def _message(msg: object, where: str) -> dict:
    if not isinstance(msg, dict):
        raise RowError(f"{where} is {json_type(msg)}, expected an object with 'role' and 'content'")
    role, content = msg.get("role"), msg.get("content")
    if "role" not in msg:
        hint = " (ShareGPT-style 'from'/'value' messages must be converted to 'role'/'content')" if "from" in msg else ""
        raise RowError(f"{where} has no 'role'{hint}")
    if not isinstance(role, str):
        raise RowError(f"{where} role is {json_type(role)}, expected a string (one of: {', '.join(ROLES)})")
    if role not in ROLES:
        hint = "; roles are lower-case" if role.lower() in ROLES else ""
        raise RowError(f"{where} has unknown role {role!r} (known: {', '.join(ROLES)}{hint})")
    if "content" not in msg:
        raise RowError(f"{where} ({role}) has no 'content'")
    if not isinstance(content, str):
        raise RowError(f"{where} ({role}) content is {json_type(content)}, expected a string")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as err:  # a JSON escape such as "\ud800" decodes to half a character
        raise RowError(f"{where} ({role}) content is not valid Unicode (a lone surrogate at character {err.start})") from None
    # Keep extra keys (tool_calls, name …): a template may render them. Keys set to null are
    # dropped, as apply_chat_template does, so `is defined` tests in templates see the same.
    return {key: value for key, value in msg.items() if value is not None}
