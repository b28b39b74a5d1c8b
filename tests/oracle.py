"""An independent oracle for the generation-context rule (shared/DESIGN.md, "Generation contexts").

It never imports mtdpo.preprocess: it renders with transformers' `apply_chat_template` and
tokenizes with the tokenizer directly, so a bug in mtdpo's masking cannot hide in it.

For each assistant message i after the shared prompt (the messages both sides share):

    context_i    = render(messages[:i], add_generation_prompt=True)
    completion_i = what the template renders for message i when it is the last message,
                   i.e. render(messages[:i+1]) after context_i, cut just after the family's end
                   of turn

and the turn is `(context_ids, completion_ids)`: `tokenize(context_i + completion_i)` with
`add_special_tokens=False` (the template writes BOS), split where the context ends.

How each case is decided (and why):

- The end of turn is the LAST end-of-turn marker in the completion (`end_of_turn_markers`, else
  `end_of_turn`), so that a turn the model generates as several messages (gpt-oss: an analysis
  message `...<|end|>` then a call `...<|call|>`) stays whole, while what the template writes
  after the marker is not counted: whitespace (`\\n`), Phi's `eos_token` written when there is
  no generation prompt, Command R7B's `<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>` appended after
  every conversation.
- Families with no end-of-turn marker (GLM: `end_of_turn` null, `stop_tokens`) stop by emitting
  the next role token. Which one is read off the template: the stop token it writes right after
  an assistant turn when a message of the next message's role follows (`<|observation|>` before
  a tool result, `<|user|>` before a user turn), on a two-message probe (the real conversation
  may re-render the turn: GLM drops reasoning before the last user message). The side's last
  turn is treated as followed by a user message (`<|user|>`): after a final answer the
  conversation goes back to the user, and GLM's format has no end-of-conversation token
  (`<|endoftext|>` ends a document, not a turn).
- When `render(messages[:i+1])` does not start with context_i (the history is rendered
  differently once message i follows: Hermes writes `\\n</tool_response>\\n<|im_end|>` after a
  tool result inside the conversation but `\\n</tool_response><|im_end|>` when the tool result is
  last; gpt-oss drops an earlier analysis message once a final answer follows; Mistral Nemo
  writes the system prompt only into a user turn that is the last message), the model still
  saw context_i and generated message i after its generation prompt G (context_i less
  `render(messages[:i])`):
  * G not empty: the completion is the text after the LAST occurrence of G in
    `render(messages[:i+1])` that ends past the point where the two renders part; failing that,
    of G without its trailing whitespace (the older R1-distill template writes
    `<｜Assistant｜>\\n` as the generation prompt but `<｜Assistant｜>` + content in a conversation:
    the model saw the newline and wrote the content);
  * G empty (Mistral: the model answers right after `[/INST]`): the message starts where the
    render parts from the same history followed by a placeholder assistant message;
  * G ends by opening a tag (QwQ's and Nemotron's `<think>\\n`) that the message's render lacks:
    if the message is rendered right after the rest of G and its text closes the tag
    (`R\\n</think>\\n\\nA`, a reasoning model's raw output), the completion is that text, written
    after the opening tag;
  * otherwise (a message without reasoning, or with it only in `reasoning_content` that the
    template does not render, after a prompt that opens `<think>\\n`): what the model wrote after
    that opener is not in the message, and the turn is not expressible.
- A template that raises for the messages (a null content in a `+`, string concatenation of a
  dict of arguments, a tool-call id of the wrong length) makes the turn not expressible.
- If the context's end is not a token boundary of the joint encoding, the turn is not
  expressible (a model never sees such a split).

Input preparation, as the team contract says a server does: tool-call `arguments` given as a
JSON string are parsed to a dict; `reasoning_content` / `thinking` / `reasoning` are aliased so
the message carries both `reasoning_content` and `thinking`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field

REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


@dataclass
class Turn:
    """One trained assistant turn as the oracle expects it; `problem` says why it is not expressible."""

    message: int
    context_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    problem: str | None = None
    note: str | None = None  # how the completion was found when the render is not a plain prefix
    dropped: list[str] = field(default_factory=list)  # parts of the message the template does not render
    context: str = ""
    completion: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None


# ── input ─────────────────────────────────────────────────────────────────────


def sides(row: dict) -> dict[str, list[dict]]:
    """The two whole conversations of a row (RLHFlow shape, or TRL shape with a message-list prompt)."""
    if "prompt" not in row:
        return {"chosen": row["chosen"], "rejected": row["rejected"]}
    prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    out = {}
    for side in ("chosen", "rejected"):
        rest = row[side] if isinstance(row[side], list) else [{"role": "assistant", "content": row[side]}]
        out[side] = [*prompt, *rest]
    return out


def shared_prompt_length(chosen: list[dict], rejected: list[dict]) -> int:
    """Messages both sides share (the longest common prefix of whole messages)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def prepare(messages: list[dict]) -> list[dict]:
    """What a chat server hands the template: JSON-string arguments parsed, reasoning aliased."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call)
            if isinstance(fn.get("arguments"), str):
                fn["arguments"] = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
        reasoning = next((m[k] for k in REASONING_KEYS if m.get(k) is not None), None)
        if reasoning is not None:
            m["reasoning_content"] = m["thinking"] = reasoning
    return out


# ── the rule ──────────────────────────────────────────────────────────────────


def row_turns(tok, spec: dict, row: dict) -> dict[str, list[Turn]]:
    """Expected turns of both sides of a row."""
    both = sides(row)
    n_prompt = shared_prompt_length(both["chosen"], both["rejected"])
    kwargs = dict(row.get("chat_template_kwargs") or {})
    return {side: side_turns(tok, spec, msgs, n_prompt, row.get("tools"), kwargs) for side, msgs in both.items()}


def side_turns(tok, spec: dict, messages: list[dict], n_prompt: int, tools=None, kwargs=None) -> list[Turn]:
    """Expected turns of one side: one per assistant message at or after `n_prompt`."""
    messages = prepare(messages)
    render = _renderer(tok, tools, kwargs or {})
    return [
        _turn(tok, spec, render, messages, i)
        for i in range(n_prompt, len(messages))
        if messages[i]["role"] == "assistant"
    ]


def _renderer(tok, tools, kwargs):
    def render(messages: list[dict], generation_prompt: bool) -> str:
        return tok.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )

    return render


def _turn(tok, spec: dict, render, messages: list[dict], i: int) -> Turn:
    turn = Turn(message=i)
    try:
        context = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        completion, turn.note = _completion_after(context, full, render(messages[:i], False), render, messages, i)
        completion = _cut_at_end_of_turn(spec, render, messages, i, full, completion)
    except NotExpressible as err:
        turn.problem = str(err)
        return turn
    except Exception as err:  # the template raised (jinja2 errors, TypeError on None + str, ...)
        turn.problem = f"template raises: {type(err).__name__}: {str(err)[:160]}"
        return turn
    turn.context, turn.completion = context, completion
    turn.dropped = dropped_parts(messages[i], completion)
    try:
        turn.context_ids, turn.completion_ids = split_tokens(tok, context, completion)
    except NotExpressible as err:
        turn.problem = str(err)
    return turn


def dropped_parts(message: dict, completion: str) -> list[str]:
    """What of the message the rendered turn leaves out (its answer text, its reasoning, a tool
    call's name). Such a turn is still expressible (the model is trained on what the template
    renders), but training it teaches the model to leave that out: worth knowing when counting
    rows a preprocessor rejects."""
    out = []
    content = message.get("content")
    # the answer, and the text of an inline think block (written into the content, or the raw
    # output after a <think> opener), each piece on its own
    pieces = re.split(r"</?think>", content) if isinstance(content, str) else []
    if any(piece.strip() and piece.strip() not in completion for piece in pieces):
        out.append("content")
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning.strip() and reasoning.strip() not in completion:
        out.append("reasoning")
    for n, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function", call)
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        values = [v for v in _leaves(arguments) if isinstance(v, str)]
        shown = [(v, json.dumps(v)[1:-1]) for v in values]  # as written, or JSON-escaped (ensure_ascii)
        if function["name"] not in completion or any(a not in completion and b not in completion for a, b in shown):
            out.append(f"tool call {n}")
    return out


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


class NotExpressible(Exception):
    """The turn cannot be written as (context, completion) token ids; the message says why."""


PLACEHOLDER = "\u00a7\u00a7"  # content no real message starts with


def _completion_after(
    context: str, full: str, history: str, render, messages: list[dict], i: int
) -> tuple[str, str | None]:
    """The text the model generated after `context`, found in `full` (see the module docstring)."""
    if full.startswith(context):
        return full[len(context) :], None
    opener = context[len(history) :] if context.startswith(history) else ""
    parted = _common_prefix(context, full)
    if not opener:  # no generation prompt: the message starts where a different message would
        start = _common_prefix(full, render([*messages[:i], {"role": "assistant", "content": PLACEHOLDER}], False))
        return full[start:], "history re-rendered, no generation prompt; completion located with a placeholder message"
    for header in dict.fromkeys([opener, opener.rstrip()]):
        at = full.rfind(header) if header else -1
        if at >= 0 and at + len(header) >= parted:
            return full[at + len(header) :], f"history re-rendered; completion taken after the last {header!r}"
    # The prompt ends by opening a tag block, e.g. "<think>\n", which the render of the message
    # lacks: if the message is rendered right after the rest of the prompt and closes that tag, it
    # is the model's raw output after the opening tag.
    stripped = opener.rstrip()
    if stripped.endswith(">") and "<" in stripped:
        tag_at = stripped.rindex("<")
        name = stripped[tag_at + 1 : -1]
        before = opener[:tag_at]
        at = full.rfind(before) if before else -1
        if name.isidentifier() and at >= 0 and at + len(opener) >= parted:
            rest = full[at + len(before) :]
            if "</" + name + ">" in rest:
                return rest, f"the prompt opens <{name}>; the message holds the rest of the block"
    raise NotExpressible(
        f"the render with this message does not start with its generation context, and the generation prompt "
        f"{opener!r} is not where this message is rendered (they part at {full[parted : parted + 40]!r} "
        f"vs {context[parted : parted + 40]!r})"
    )


def _cut_at_end_of_turn(spec: dict, render, messages: list[dict], i: int, full: str, completion: str) -> str:
    """Cut after the last end-of-turn marker, or append the stop token of a stop-token family."""
    markers = spec.get("end_of_turn_markers") or ([spec["end_of_turn"]] if spec.get("end_of_turn") else [])
    ends = [completion.rfind(m) + len(m) for m in markers if m in completion]
    if ends:
        return completion[: max(ends)]
    if not spec.get("stop_tokens"):
        raise NotExpressible(f"no end-of-turn marker ({', '.join(markers)}) in the rendered turn {completion[-60:]!r}")
    return completion + _stop_token(spec, render, messages, i, full)


def _stop_token(spec: dict, render, messages: list[dict], i: int, full: str) -> str:
    """The stop token the template writes right after an assistant turn when the side's next
    message (for the last turn: a user message) follows it. Read off a two-message probe, because
    in the real conversation the next message may also re-render the turn (GLM drops reasoning
    before the last user message)."""
    role = messages[i + 1]["role"] if i + 1 < len(messages) else "user"
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    nxt = (
        {"role": role, "content": "r"}
        if role != "tool"
        else {"role": "tool", "content": "r", "tool_call_id": "c00000001", "name": "f"}
    )
    short, longer = render(probe, False), render([*probe, nxt], False)
    if not longer.startswith(short):
        raise NotExpressible(f"the probe turn is re-rendered once a {role} message follows; its stop token is unknown")
    rest = longer[len(short) :]
    for token in spec["stop_tokens"]:
        if rest.startswith(token):
            return token
    raise NotExpressible(
        f"no stop token {spec['stop_tokens']} follows an assistant turn before a {role} message ({rest[:40]!r})"
    )


def split_tokens(tok, context: str, completion: str) -> tuple[list[int], list[int]]:
    """Tokenize context + completion once and split where the context ends; a token that
    straddles that point means no model ever sees this split."""
    enc = tok(context + completion, add_special_tokens=False, return_offsets_mapping=True)
    ids, cut = enc["input_ids"], len(context)
    for n, (start, end) in enumerate(enc["offset_mapping"]):
        if start < cut < end:
            raise NotExpressible(
                f"a token of context + completion straddles the end of the context: {(context + completion)[start:end]!r}"
            )
        if start >= cut:
            return ids[:n], ids[n:]
    return ids, []


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
