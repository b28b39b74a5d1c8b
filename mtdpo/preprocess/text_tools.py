"""`--tools-as-text`: tool calls, tool results and tool schemas written as plain text, for chat
templates with no tool support (Gemma's raise on a `tool` message and never read `tool_calls`).

A row conversion before templating, so the masking rule applies unchanged: what is trained is
what the assistant turn renders, its call blocks included. The form is the research recipe's
for Gemma (calls as ```python blocks in the assistant's text, results as ```output user turns),
made family-neutral:

- each tool call is appended to its assistant message's content (after a newline), one fenced
  block per call: a call of a tool named `python` whose only argument is `code` as
  ```python\\n<code>\\n```, any other as ```tool_call\\n{"name": ..., "arguments": {...}}\\n```;
- a tool result (role tool, ipython, observation or function) becomes a user message
  ```output\\n<content>\\n``` (content already fenced is kept as it is); the results of one turn's
  calls make one user message, their blocks one per line;
- the row's `tools` schemas go into the system message, or in front of the first user message
  when there is none (TOOLS_HEADER, then each schema as one line of JSON).
"""

from __future__ import annotations

import json

from mtdpo.families import TOOL_ROLES

TOOLS_HEADER = (
    'You can use these tools. Call one with a ```tool_call block holding {"name": ..., "arguments": {...}} '
    "(the python tool: a ```python block of code); its result comes back in an ```output block."
)


def tools_as_text(messages: list[dict], tools: list[dict] | None = None) -> list[dict]:
    """The conversation with its tool calls, results and schemas written as text (module doc)."""
    out: list[dict] = []
    after_result = False  # the last message written holds tool results
    for message in messages:
        if message["role"] in TOOL_ROLES:
            content = message.get("content", "")
            block = content if content.lstrip().startswith("```") else _fenced("output", content)
            if after_result:  # another result of the same turn's calls
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
            after_result = True
            continue
        after_result = False
        if message.get("tool_calls"):
            calls = [_call_block(call["function"]) for call in message["tool_calls"]]
            text = "\n".join(filter(None, [message.get("content", ""), *calls]))
            message = {key: value for key, value in message.items() if key != "tool_calls"} | {"content": text}
        out.append(message)
    return _with_schemas(out, tools) if tools else out


def _call_block(function: dict) -> str:
    name, arguments = function["name"], function.get("arguments", {})
    if name == "python" and isinstance(arguments, dict) and list(arguments) == ["code"]:
        return _fenced("python", str(arguments["code"]))
    return _fenced("tool_call", json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False))


def _fenced(language: str, text: str) -> str:
    return f"```{language}\n{text}\n```"


def _with_schemas(messages: list[dict], tools: list[dict]) -> list[dict]:
    schemas = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
    text = f"{TOOLS_HEADER}\n{schemas}"
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content', '')}\n\n{text}".lstrip()}, *messages[1:]]
    if messages and messages[0]["role"] == "user":
        first = messages[0]
        return [{**first, "content": f"{text}\n\n{first.get('content', '')}".rstrip()}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
