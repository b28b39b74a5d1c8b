"""The masking rule: which characters of a rendered conversation are trained, and the
self-check that proves it for each row. Pure functions of the rendered text, never of token ids.

For each assistant message i after the shared prompt, the trained characters are exactly what
the model generates for that turn: from the end of the generation prompt,
`render(messages[:i], add_generation_prompt=True)`, through the turn's end-of-turn marker
inclusive (content, reasoning, tool-call text and the marker), not the template's whitespace
after the marker. Everything else (system, user and tool turns, tool schemas, role headers, BOS,
the shared prompt) is -100 (docs/DESIGN.md, "The masking rule").

    assistant_spans(render, messages, n_prompt, text, ...)  -> one TurnSpan per trained message
    trained_ranges(token starts, spans)                     -> which tokens are trained
    check_spans(text, token bounds, messages, spans)        -> RowError unless the mask is right

A span's end comes from rendering the conversation up to and including the message (for a
template that renders the last message differently, Qwen3's empty `<think>` block, from one
message further); a token follows the character that starts it. Only where a template's
generation prompt is not a prefix of the conversation (it appends text the conversation never
renders) is the start found by locating the content string instead. The self-check rejects a
row whose span does not hold the message's content, reasoning and every tool call's name and
arguments, or whose span boundaries cut a token: the mask is right or the row is not used.
(skeleton.py finds the same spans from one render per conversation shape, where it can.)
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate

from mtdpo.cache import IGNORE_INDEX
from mtdpo.preprocess.rows import RowError
from mtdpo.preprocess.template import Render
from mtdpo.preprocess.tokens import common_prefix_length

# Replaces a message's content to see where its render starts to depend on it.
STAND_IN = "\x00mtdpo stand-in\x00"


@dataclass(frozen=True)
class TurnSpan:
    """The trained characters [start, end) of one assistant message, in the rendered text."""

    message: int  # index of the message in the conversation
    header_end: int  # where the template's generation prompt for it ends in the text
    start: int  # where training starts: header_end, unless the content had to be located
    end: int  # just after the end-of-turn marker
    turn_end: int  # end of the message's render (end + the template's whitespace after it)


# ── the rule: render → character spans ───────────────────────────────────────


def assistant_spans(
    render: Render,
    messages: list[dict],
    n_prompt: int,
    text: str,
    markers: tuple[str, ...],
    closing: str = "",
    end_of_turn_marker: str = "",
    untokenized_end: str = "",
) -> list[TurnSpan]:
    """One span per assistant message after the shared prompt, from renders of prefixes.
    `untokenized_end`: the template's end-of-turn text when it is not a token (ChatTemplate)."""
    spans = []
    for i in range(n_prompt, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        if not (message_text(messages[i]).strip() or messages[i].get("tool_calls") or reasoning(messages[i])):
            raise RowError(f"message {i} (assistant) is empty: no content, reasoning or tool calls")
        turn_end = message_end(render, messages, i, text, closing, end_of_turn_marker)
        header_end, start = generation_start(render, messages, i, text, closing, turn_end, markers)
        if start > turn_end:
            raise RowError(f"message {i} (assistant): the template renders it inside its generation prompt")
        end = end_of_turn(text, start, turn_end, markers, i, untokenized_end)
        spans.append(TurnSpan(i, header_end, start, end, turn_end))
    return spans


def message_end(render: Render, messages: list[dict], i: int, text: str, closing: str, end_of_turn_marker: str) -> int:
    """Where message i's render ends in the conversation's text: the end of `render(messages[:i+1])`.

    Some templates render the last message differently (Qwen3 gives it an empty `<think>`
    block): when that render is not a prefix, the end is the last end-of-turn marker before
    the next message's content, found by rendering one message further twice, with that
    content and with a stand-in, and seeing where the two part.
    """
    if i + 1 == len(messages):
        return prefix_end(text, text, closing, i + 1)
    try:
        return prefix_end(render(messages[: i + 1]), text, closing, i + 1)
    except RowError as err:
        if not end_of_turn_marker:
            raise
        unstable = err
    further = render(messages[: i + 2])
    stand_in = render([*messages[: i + 1], dict(messages[i + 1], content=STAND_IN)])
    parting = common_prefix_length(further, stand_in)  # inside the next message's content
    end = text.rfind(end_of_turn_marker, 0, parting)
    if parting == len(further) or end == -1 or not text.startswith(further[:parting]):
        raise unstable
    return end + len(end_of_turn_marker)


def prefix_end(rendered: str, text: str, closing: str, n: int) -> int:
    """Where a render of the first n messages ends inside the whole conversation's text."""
    if closing and rendered.endswith(closing):
        rendered = rendered[: -len(closing)]
    if text.startswith(rendered):
        return len(rendered)
    raise RowError(
        f"chat template is not prefix-stable: the first {n} messages render differently inside the "
        "whole conversation (the template rewrites earlier turns), so the mask cannot be trusted"
    )


def generation_start(
    render: Render, messages: list[dict], i: int, text: str, closing: str, turn_end: int, markers: tuple[str, ...]
) -> tuple[int, int]:
    """(end of the generation prompt, first trained character) for assistant message i."""
    try:
        prompted = render(messages[:i], True)
    except RowError:
        prompted = None  # e.g. a template that cannot render an empty conversation (i == 0)
    if prompted is not None and text.startswith(prompted):
        return len(prompted), len(prompted)  # the rule
    # Fallback: the generation prompt adds text the conversation does not render (a
    # `<think>` opener, an empty thinking block). The header ends where the two part.
    turn_start = prefix_end(render(messages[:i]), text, closing, i) if i else 0
    header_end = turn_start
    if prompted is not None and prompted.startswith(text[:turn_start]):
        header_end += common_prefix_length(text[turn_start:turn_end], prompted[turn_start:])
        # Back to a clean break: `<think>` and `<tool_call>` share "<t", which is no header.
        while header_end > turn_start and not (text[header_end - 1].isspace() or text.endswith(markers, 0, header_end)):
            header_end -= 1
    content = message_text(messages[i])
    for needle in (content, content.strip()):
        if needle and (found := text.find(needle, header_end, turn_end)) != -1:
            return header_end, found
    if content.strip():
        raise RowError(
            f"message {i} (assistant): its text is not in the rendered turn (the template drops or alters it)"
        )
    return header_end, header_end


def end_of_turn(
    text: str, start: int, turn_end: int, markers: tuple[str, ...], i: int, untokenized_end: str = ""
) -> int:
    """The end of the turn's end-of-turn marker: the template's whitespace after it is not trained."""
    body = text[start:turn_end].rstrip()
    if not body.endswith(markers) and untokenized_end and body.endswith(untokenized_end):
        raise RowError(
            f"message {i} (assistant): the template ends the turn with {untokenized_end!r}, which is not one token "
            "in this tokenizer (not an added token); use the tokenizer the template was written for"
        )
    if not body.endswith(markers):
        raise RowError(
            f"message {i} (assistant): the template closes it with no end-of-turn token (it ends {body[-30:]!r})"
        )
    return start + len(body)


# ── spans → labels ────────────────────────────────────────────────────────────


def trained_ranges(starts: list[int], spans: list[TurnSpan]) -> list[tuple[int, int]]:
    """Token index ranges [a, b) to train: a token is trained iff the character that starts it
    is inside a span. `starts` never decrease (TokenBounds), so each range is two bisections."""
    return [(bisect_left(starts, span.start), bisect_left(starts, span.end)) for span in spans]


def labels_for(ids: list[int], ranges: list[tuple[int, int]]) -> list[int]:
    """The ids inside the ranges, IGNORE_INDEX elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in ranges:
        labels[a:b] = ids[a:b]
    return labels


@dataclass(frozen=True)
class TokenBounds:
    """Where tokens start, and reach[k]: the furthest any of tokens 0..k ends."""

    starts: list[int]
    reach: list[int]

    @classmethod
    def of(cls, starts: list[int], ends: list[int]) -> TokenBounds:
        if starts != sorted(starts):  # no tokenizer does this; the bisections would be wrong if one did
            raise RowError("the tokenizer returned token offsets out of order; the mask cannot be placed")
        return cls(starts, ends if ends == sorted(ends) else list(accumulate(ends, max)))

    def cuts_a_token(self, position: int) -> bool:
        """Whether a token starts before `position` and ends after it."""
        k = bisect_left(self.starts, position)  # the tokens that start before it: 0..k-1
        return k > 0 and self.reach[k - 1] > position


# ── the self-check ────────────────────────────────────────────────────────────


def check_spans(text: str, tokens: TokenBounds, messages: list[dict], spans: list[TurnSpan]) -> None:
    """Raise RowError unless every span holds all of its message and cuts no token.

    Per span: nothing but whitespace between the generation prompt and the start; the
    content, reasoning, and each tool call's name and arguments inside [start, end); start
    and end on token boundaries, so no trained token reaches into a header or the next turn.
    """
    for span in spans:
        i, trained = span.message, text[span.start : span.end]
        if text[span.header_end : span.start].strip():
            raise RowError(
                f"message {i} (assistant): the template renders text before its content that the mask would skip"
            )
        for what, needles in message_parts(messages[i]):
            if not any(needle in trained for needle in needles):
                raise RowError(
                    f"message {i} (assistant): its {what} is not in the rendered turn (the template drops or alters it)"
                )
        if tokens.cuts_a_token(span.start):
            raise RowError(
                f"message {i} (assistant): its first character shares a token with the generation prompt; the mask would cut it"
            )
        if tokens.cuts_a_token(span.end):
            raise RowError(
                f"message {i} (assistant): its end-of-turn marker shares a token with the next text; the mask would cut it"
            )


def message_parts(message: dict) -> list[tuple[str, list[str]]]:
    """(what, ways it may be rendered) for each piece of an assistant message that its span must hold."""
    parts = []
    content = message_text(message)
    if "</think>" in content:  # Qwen3-style templates move an inline <think> block out of the content
        pieces = [p.strip() for p in content.replace("<think>", "</think>").split("</think>")]
    else:
        pieces = [content.strip()]
    parts += [("text", [p]) for p in pieces if p]
    if thought := reasoning(message).strip():
        parts.append(("reasoning", [thought]))
    for k, call in enumerate(message.get("tool_calls") or []):
        function = call["function"]
        parts.append((f"tool call {k} name", [function["name"]]))
        for leaf in argument_leaves(function.get("arguments")):
            parts.append((f"tool call {k} arguments", rendered_forms(leaf)))
    return parts


def message_text(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def reasoning(message: dict) -> str:
    value = message.get("reasoning_content")
    return value if isinstance(value, str) else ""


def argument_leaves(arguments) -> list:
    """The keys and scalar values of a tool call's arguments (a dict or a JSON string)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return [arguments]
    leaves, stack = [], [arguments]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            leaves += list(value)
            stack += list(value.values())
        elif isinstance(value, list):
            stack += value
        elif value is not None:
            leaves.append(value)
    return leaves


def rendered_forms(leaf) -> list[str]:
    """A key or value as a template may write it: as is, JSON-escaped once (tojson), or twice
    (a JSON string of arguments passed through tojson)."""
    if isinstance(leaf, str):
        once = json.dumps(leaf, ensure_ascii=False)[1:-1]
        return [leaf, once, json.dumps(once, ensure_ascii=False)[1:-1]]
    return [json.dumps(leaf), str(leaf)]
