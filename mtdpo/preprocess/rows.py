"""Turn one raw input row into a validated preference pair of full conversations, or (for a KTO
cache) into one labelled conversation.

Two pair shapes are accepted (docs/DESIGN.md, "Input"):
  {"chosen": [msgs], "rejected": [msgs]}                 full conversations (RLHFlow style)
  {"prompt": [msgs] | str, "chosen": [msgs] | str, "rejected": [msgs] | str}   TRL style
Either way the shared prompt is the longest common prefix of whole messages of the two
full conversations, so both shapes mask the same way.

Messages are in the OpenAI / transformers chat format. Content is a string, a list of text
parts (`[{"type": "text", "text": ...}]`, joined into one string) or, for an assistant turn
that only calls tools or only reasons, null/empty. An assistant message may carry
`tool_calls: [{"type": "function", "function": {"name": str, "arguments": object | JSON
string}, "id"?: str}]` and `reasoning_content` (or `thinking` / `reasoning`: transformers'
names, aliased the same way); a tool message may carry `tool_call_id` / `name`. Optional row
keys: `tools` (JSON schemas, given to the template as `tools=`; `chosen_tools` /
`rejected_tools` must then be equal) and `chat_template_kwargs` (e.g. `enable_thinking`). The sides must first differ at an
assistant message (on at least one side): a pair whose sides first differ at a user, system or
tool message on both sides answers two different prompts, which DPO cannot compare.

Unpaired rows (KTO; `to_unpaired`), in two shapes:
  {"messages": [msgs], "label": true | false}           a whole trajectory (`mtdpo pairs --kto`)
  {"prompt": [msgs] | str, "completion": [msgs] | str, "label": true | false}   TRL's shape
The prompt is `prompt` when given, else the messages before the first assistant message; every
assistant message after it is trained, as on a pair's side. `tools` and `chat_template_kwargs`
work as for pairs; other keys (`prompt_id`, `reward`, `gt` …) are carried by the input only.
`row_kind` tells the two families apart by their keys: a file holds one (preprocess refuses a mix).

Every RowError message is written to rejects.jsonl as is, so it names the place (`chosen[1]`)
and says what is wrong in JSON terms (null, a number, an object), not Python's.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from mtdpo.preprocess import text_tools

ROLES = ("system", "user", "assistant", "tool", "observation", "ipython", "function")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # transformers' names, first = standard
# Names the template itself is rendered with: a row cannot override them.
RESERVED_TEMPLATE_ARGS = ("messages", "tools", "documents", "add_generation_prompt")
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
    tools: list[dict] | None = None  # JSON schemas given to the template (both sides)
    template_kwargs: dict | None = None  # extra template variables (enable_thinking …)


def problem_key(messages: list[dict], tools: list[dict] | None, template_kwargs: dict | None) -> int:
    """A 64-bit key of the problem a conversation answers: its messages before the first assistant
    message, with the tools and template variables it is rendered with. The pairs of one problem
    share it even where their shared prompts differ (two trajectories that open with the same turn
    share it too): what `--group-by-prompt` groups by."""
    first = next((k for k, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    text = json.dumps([messages[:first], tools, template_kwargs], sort_keys=True, ensure_ascii=False, default=str)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def to_pair(row: object, string_arguments: bool = False, tools_as_text: bool = False) -> Pair:
    """The row as a Pair. Tool-call arguments given as a JSON string are parsed to an object, as a
    chat server does before rendering (the model writes the object); `string_arguments` keeps them.
    `tools_as_text` writes tool calls, results and schemas into the messages' text (text_tools.py)."""
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
            raise RowError(
                f"{side} has {len(sides[side]):,} messages, more than the {MAX_MESSAGES} mtdpo renders per row"
            )
    if not string_arguments:
        sides = {side: [with_parsed_arguments(m) for m in msgs] for side, msgs in sides.items()}
    tools = _tools(row)
    if tools_as_text:
        sides, tools = {side: text_tools.tools_as_text(msgs, tools) for side, msgs in sides.items()}, None
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
    return Pair(chosen, rejected, n_prompt, tools, _template_kwargs(row))


def with_parsed_arguments(message: dict) -> dict:
    """The message with each tool call's JSON-string arguments as the object they hold (validated
    as JSON objects by `_tool_calls`)."""
    calls = message.get("tool_calls")
    if not calls or not any(isinstance(call["function"].get("arguments"), str) for call in calls):
        return message
    parsed = []
    for call in calls:
        arguments = call["function"].get("arguments")
        if isinstance(arguments, str):
            call = {**call, "function": {**call["function"], "arguments": json.loads(arguments)}}
        parsed.append(call)
    return {**message, "tool_calls": parsed}


PAIR_KEYS = ("chosen", "rejected")
UNPAIRED_KEYS = ("label", "completion", "messages")


def row_kind(row: object) -> str | None:
    """ "pair" for a row with chosen/rejected, "kto" for an unpaired one (label, completion or
    messages), None when its keys say neither (it is rejected as a row of the file's kind)."""
    if not isinstance(row, dict):
        return None
    if any(row.get(key) is not None for key in PAIR_KEYS):
        return "pair"
    if any(row.get(key) is not None for key in UNPAIRED_KEYS):
        return "kto"
    return None


@dataclass(frozen=True)
class Unpaired:
    """One labelled trajectory (KTO): its messages, how many of them are the prompt, the label."""

    messages: list[dict]
    n_prompt: int  # leading messages never trained
    desirable: bool
    tools: list[dict] | None = None
    template_kwargs: dict | None = None


def to_unpaired(row: object, string_arguments: bool = False, tools_as_text: bool = False) -> Unpaired:
    """The row as an Unpaired trajectory; tool-call arguments and `tools_as_text` as `to_pair` reads them."""
    if not isinstance(row, dict):
        raise RowError(f"row is {json_type(row)}, expected a JSON object")
    if "label" not in row:
        raise RowError(f"missing key 'label' (row keys: {sorted(row)})")
    label = row["label"]
    if not isinstance(label, bool):
        raise RowError(f"label is {json_type(label)}, expected true (desirable) or false (undesirable)")
    if row.get("completion") is not None:
        prompt = _messages(row["prompt"], "prompt", "user") if row.get("prompt") is not None else []
        completion = _messages(row["completion"], "completion", "assistant")
        if row.get("messages") is not None:
            raise RowError("the row has both 'messages' and 'completion': give the trajectory once")
        messages, n_prompt = prompt + completion, len(prompt)
        where = "completion"
    elif row.get("messages") is not None:
        messages = _messages(row["messages"], "messages", "user")
        n_prompt = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        where = "messages"
    else:
        raise RowError(f"missing key 'messages' or 'completion' (row keys: {sorted(row)})")
    if len(messages) > MAX_MESSAGES:
        raise RowError(f"{where} has {len(messages):,} messages, more than the {MAX_MESSAGES} mtdpo renders per row")
    if not any(m["role"] == "assistant" for m in messages[n_prompt:]):
        after = f" after the prompt ({n_prompt} messages)" if where == "completion" else ""
        raise RowError(f"{where} has no assistant message{after}")
    if not string_arguments:
        messages = [with_parsed_arguments(m) for m in messages]
    tools = _tools(row)
    if tools_as_text:  # the schemas go into the prompt, which stays the prompt
        prompt = text_tools.tools_as_text(messages[:n_prompt], tools)
        messages, n_prompt, tools = prompt + text_tools.tools_as_text(messages[n_prompt:]), len(prompt), None
    return Unpaired(messages, n_prompt, label, tools, _template_kwargs(row))


def _tools(row: dict) -> list[dict] | None:
    """The row's tool schemas; per-side copies must agree (DPO compares answers to one prompt)."""
    given = {key: row[key] for key in ("tools", "chosen_tools", "rejected_tools") if row.get(key) is not None}
    if len({json.dumps(v, sort_keys=True) for v in given.values()}) > 1:
        raise RowError(f"{' and '.join(given)} differ: both sides must answer with the same tools")
    if not given:
        return None
    key, tools = next(iter(given.items()))
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError(f"{key} is {json_type(tools)}, expected a list of JSON schema objects")
    return tools


def _template_kwargs(row: dict) -> dict | None:
    kwargs = row.get("chat_template_kwargs")
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise RowError(f"chat_template_kwargs is {json_type(kwargs)}, expected an object")
    if reserved := sorted(set(kwargs) & set(RESERVED_TEMPLATE_ARGS)):
        raise RowError(f"chat_template_kwargs may not set {', '.join(reserved)}: mtdpo renders those itself")
    return kwargs


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
    if (
        type(msg) is dict
        and len(msg) == 2
        and type(msg.get("content")) is str
        and msg.get("role") in ROLES
        and msg["content"].isascii()
    ):
        return dict(msg)  # the common case, {"role", "content": plain text}: nothing below can object
    if not isinstance(msg, dict):
        raise RowError(f"{where} is {json_type(msg)}, expected an object with 'role' and 'content'")
    role, content = msg.get("role"), msg.get("content")
    if "role" not in msg:
        hint = (
            " (ShareGPT-style 'from'/'value' messages must be converted to 'role'/'content')" if "from" in msg else ""
        )
        raise RowError(f"{where} has no 'role'{hint}")
    if not isinstance(role, str):
        raise RowError(f"{where} role is {json_type(role)}, expected a string (one of: {', '.join(ROLES)})")
    if role not in ROLES:
        hint = "; roles are lower-case" if role.lower() in ROLES else ""
        raise RowError(f"{where} has unknown role {role!r} (known: {', '.join(ROLES)}{hint})")
    calls = _tool_calls(msg.get("tool_calls"), where) if role == "assistant" else None
    thought = _reasoning(msg, where)
    if "content" not in msg and not (calls or thought):
        raise RowError(f"{where} ({role}) has no 'content'")
    content = _content(content, f"{where} ({role})", may_be_null=role == "assistant" and bool(calls or thought))
    # Keep extra keys (name, tool_call_id …): a template may render them. Keys set to null are
    # dropped, as apply_chat_template does (a call-only turn's null content too), so templates
    # see what they see there.
    out = {key: value for key, value in msg.items() if value is not None}
    if content is not None:
        out["content"] = content
    if calls:
        out["tool_calls"] = calls
    if thought is not None:  # as transformers aliases it: templates read either name
        out.update(thinking=thought, reasoning_content=thought)
    return out


def _content(content: object, where: str, may_be_null: bool) -> str | None:
    if content is None and may_be_null:
        return None
    if isinstance(content, list):
        content = "".join(_text_part(part, f"{where} content part {k}") for k, part in enumerate(content))
    if not isinstance(content, str):
        expected = "a string or a list of text parts" + (" (null only with tool_calls)" if content is None else "")
        raise RowError(f"{where} content is {json_type(content)}, expected {expected}")
    _check_unicode(content, f"{where} content")
    return content


def _text_part(part: object, where: str) -> str:
    if not isinstance(part, dict):
        raise RowError(f'{where} is {json_type(part)}, expected {{"type": "text", "text": ...}}')
    if part.get("type") != "text":
        raise RowError(f"{where} has type {part.get('type')!r}: only text parts can be trained (mtdpo is text-only)")
    if not isinstance(part.get("text"), str):
        raise RowError(f"{where} text is {json_type(part.get('text'))}, expected a string")
    return part["text"]


def _tool_calls(calls: object, where: str) -> list[dict] | None:
    """Validate OpenAI-style tool calls; arguments stay as given (an object or a JSON string)."""
    if calls is None or calls == []:
        return None
    if not isinstance(calls, list):
        raise RowError(f"{where} tool_calls is {json_type(calls)}, expected a list")
    for k, call in enumerate(calls):
        at = f"{where} tool_calls[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise RowError(
                f'{at} has no "function" object (expected {{"type": "function", "function": {{"name": ..., "arguments": ...}}}})'
            )
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RowError(f"{at} function name is {json_type(function.get('name'))}, expected a non-empty string")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except ValueError:
                raise RowError(f"{at} arguments is a string that is not valid JSON") from None
            if not isinstance(parsed, dict):
                raise RowError(f"{at} arguments is a JSON string of {json_type(parsed)}, expected an object")
            _check_unicode(arguments, f"{at} arguments")
        elif not isinstance(arguments, dict):
            raise RowError(f"{at} arguments is {json_type(arguments)}, expected an object or a JSON string")
        else:
            parsed = arguments
        if _holds_non_finite(parsed):  # Python's json reads and writes them; JSON and templates' tojson may not
            raise RowError(f"{at} arguments hold NaN/Infinity, which JSON cannot carry")
    return calls


def _holds_non_finite(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _reasoning(msg: dict, where: str) -> str | None:
    key = next((k for k in REASONING_KEYS if msg.get(k) is not None), None)
    if key is None:
        return None
    if not isinstance(msg[key], str):
        raise RowError(f"{where} {key} is {json_type(msg[key])}, expected a string")
    _check_unicode(msg[key], f"{where} {key}")
    return msg[key]


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a JSON escape such as "\ud800" decodes to half a character
        raise RowError(f"{where} is not valid Unicode (a lone surrogate at character {err.start})") from None
