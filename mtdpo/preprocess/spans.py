"""The masking rule: each trained turn scored in the context it was generated in, and the
self-check that proves it for each row. Pure functions of rendered text, never of token ids.

An agent loop that re-renders the message list at every step (every chat-completions server
does) generates assistant message i after

    context_i    = render(messages[:i], add_generation_prompt=True)

and writes `completion_i`: what the template renders for message i when it is the last message,
through the turn's end (its end-of-turn marker; for families whose model stops by emitting the
next role token, that token). The trajectory's log-prob is the sum over its trained turns of
log p(completion_i | context_i) (docs/DESIGN.md, "The masking rule").

    generation_turns(chat, render, messages, n_prompt, whole) -> one Turn per trained message
    sequences(turns, whole)                                   -> the texts to tokenize, with spans
    check_spans(text, token bounds, messages, spans)          -> RowError unless the mask is right

Where the whole conversation's render has every turn's context + completion as a prefix
(prefix-stable: most rows of most templates), a side is one sequence, the whole render. Where
it does not (think blocks dropped from history, whitespace after a tool result, a system prompt
moved into the last user turn), each maximal run of turns whose texts extend one another is one
sequence; no turn is trained twice, none is dropped. A token follows the character that starts
it. The self-check rejects a turn whose completion does not hold the message's content,
reasoning and every tool call's name and arguments, or whose boundaries cut a token: the mask is
right or the row is not used. (skeleton.py finds the same spans from one render per
conversation shape, where it can.)
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import accumulate

from mtdpo.cache import IGNORE_INDEX
from mtdpo.preprocess.rows import RowError
from mtdpo.preprocess.template import ChatTemplate, Render
from mtdpo.preprocess.tokens import common_prefix_length

# Replaces a message's content to see where its render starts to depend on it.
STAND_IN = "\x00mtdpo stand-in\x00"


@dataclass(frozen=True)
class Turn:
    """One trained assistant message as the model generated it: `completion` after `context`."""

    message: int  # index of the message in the conversation
    context: str
    completion: str

    @property
    def text(self) -> str:
        return self.context + self.completion


@dataclass(frozen=True)
class TurnSpan:
    """The trained characters [start, end) of one assistant message in a sequence's text."""

    message: int
    start: int  # where its context ends
    end: int  # just after its end of turn


@dataclass
class SequenceText:
    """One sequence of a side: the text to tokenize and the turns trained in it."""

    text: str
    spans: list[TurnSpan] = field(default_factory=list)


# ── the rule: renders → turns ─────────────────────────────────────────────────


def generation_turns(chat: ChatTemplate, render: Render, messages: list[dict], n_prompt: int, whole: str) -> list[Turn]:
    """One Turn per assistant message after the shared prompt. `whole` is render(messages)."""
    turns = []
    for i in range(n_prompt, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        if not (message_text(messages[i]).strip() or messages[i].get("tool_calls") or reasoning(messages[i])):
            raise RowError(f"message {i} (assistant) is empty: no content, reasoning or tool calls")
        context = render(messages[:i], True)
        last = whole if i + 1 == len(messages) else render(messages[: i + 1])
        tail = last[len(context) :] if last.startswith(context) else relocated_tail(render, messages, i, context, last)
        following = messages[i + 1]["role"] if i + 1 < len(messages) else None
        turns.append(Turn(i, context, completion(chat, tail, following, i)))
    return turns


def relocated_tail(render: Render, messages: list[dict], i: int, context: str, last: str) -> str:
    """What follows message i's generation prompt in `last` = render(messages[:i+1]), when the
    template renders the history differently once message i follows it (Hermes's whitespace after
    a tool result, gpt-oss dropping an earlier analysis, the older R1-distill template writing a
    newline after its generation prompt only). The model still saw `context` and wrote message i
    after its generation prompt G = context less render(messages[:i]); what it wrote is in `last`
    after the last copy of G (or of G without its trailing whitespace). A template with no
    generation prompt (Mistral) renders message i where the same history followed by a stand-in
    message parts from `last`."""
    history = render(messages[:i])
    prompt = context[len(history) :] if context.startswith(history) else None
    parting = common_prefix_length(context, last)
    if prompt:
        for needle in dict.fromkeys((prompt, prompt.rstrip())):
            at = last.rfind(needle)
            if needle and at != -1 and at + len(needle) >= parting:
                return last[at + len(needle) :]
        if (tail := written_after_opener(prompt, last, parting)) is not None:
            return tail
        raise RowError(
            f"message {i} (assistant): its generation prompt ends with {prompt[-30:]!r}, which the template does not "
            "render before the message: what the model wrote after it is not in the row"
        )
    if prompt == "":
        stand_in = render([*messages[:i], {"role": "assistant", "content": STAND_IN}])
        start = common_prefix_length(stand_in, last)
        if start < len(last) and stand_in[start:].lstrip().startswith(STAND_IN):  # "[/INST] " + text
            return last[start:]
    raise RowError(
        f"message {i} (assistant): the template renders the conversation before it differently once it follows, "
        "and its generation prompt cannot be found in that render"
    )


# A generation prompt that opens a block for the model to finish: `<think>\n` (QwQ, Nemotron).
BLOCK_OPENER = re.compile(r"<(\w+)>\s*$")


def written_after_opener(prompt: str, last: str, parting: int) -> str | None:
    """A generation prompt P + `<think>\n` whose opener the template does not render before the
    message: where the message is rendered right after P and holds the block's closer
    (`</think>`), its text is what the model wrote after the opener, the raw output a server
    returns without a reasoning parser ("R\n</think>\n\nA"). None otherwise (a message without
    the closer lost the text written inside the block)."""
    opener = BLOCK_OPENER.search(prompt)
    if opener is None or not (head := prompt[: opener.start()]):
        return None
    at = last.rfind(head)
    if at == -1 or at + len(prompt) < parting:
        return None
    tail = last[at + len(head) :]
    return tail if f"</{opener.group(1)}>" in tail else None


def completion(chat: ChatTemplate, tail: str, following: str | None, i: int) -> str:
    """The turn's text up to its end: the last end-of-turn marker in `tail` (what the template
    writes after it, whitespace or the next turn's header, is not the model's), or for a family
    whose model stops by emitting the next role token, the turn and that token."""
    if chat.ends_with_next_role:
        stop = chat.next_role_token(following or "user")
        if not stop:
            raise RowError(f"message {i} (assistant): the template writes no role token after it to stop on")
        return tail.rstrip() + stop
    end = max((tail.rfind(marker) + len(marker) for marker in chat.end_markers if marker in tail), default=-1)
    if end < 0 and chat.untokenized_end and chat.untokenized_end in tail:
        raise RowError(
            f"message {i} (assistant): the template ends the turn with {chat.untokenized_end!r}, which is not one token "
            "in this tokenizer (not an added token); use the tokenizer the template was written for"
        )
    if end < 0:
        ends = tail.rstrip()[-30:]
        markers = " or ".join(chat.end_markers) if chat.end_markers else "none found in the template"
        raise RowError(
            f"message {i} (assistant): the template closes it with no end-of-turn token ({markers}; it ends {ends!r})"
        )
    return tail[:end]


def sequences(turns: list[Turn], whole: str) -> list[SequenceText]:
    """Turns grouped into sequences: a turn joins the previous sequence when its text extends
    that sequence's text (the model saw everything before it there), else it starts a new one.
    The last sequence is the whole render where that extends it (a prefix-stable side is the
    conversation as rendered, trailing text included)."""
    groups: list[SequenceText] = []
    for turn in turns:
        text = turn.text
        if not groups or not text.startswith(groups[-1].text):
            groups.append(SequenceText(text))
        groups[-1].text = text
        groups[-1].spans.append(TurnSpan(turn.message, len(turn.context), len(text)))
    if groups and whole.startswith(groups[-1].text):
        groups[-1].text = whole
    return groups


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

    def overhang(self, position: int) -> int:
        """How far past `position` a token that starts before it reaches (0: no token is cut there)."""
        k = bisect_left(self.starts, position)  # the tokens that start before it: 0..k-1
        return max(self.reach[k - 1] - position, 0) if k else 0


# ── the self-check ────────────────────────────────────────────────────────────


def check_spans(text: str, tokens: TokenBounds, messages: list[dict], spans: list[TurnSpan]) -> None:
    """Raise RowError unless every span holds all of its message and cuts no token.

    Per span: the content, reasoning, and each tool call's name and arguments inside
    [start, end); start on a token boundary, so no trained token reaches into the context; end
    on one too, except for whitespace an end-of-turn token swallows (an added token with
    rstrip, Phi's `<|end|>`): that whitespace belongs to no turn.
    """
    for span in spans:
        i, trained = span.message, text[span.start : span.end]
        for what, needles in message_parts(messages[i]):
            if not any(needle in trained for needle in needles):
                raise RowError(
                    f"message {i} (assistant): its {what} is not in the rendered turn (the template drops or alters it)"
                )
        if tokens.overhang(span.start):
            raise RowError(
                f"message {i} (assistant): its first character shares a token with its context; the mask would cut it"
            )
        if (reach := tokens.overhang(span.end)) and text[span.end : span.end + reach].strip():
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
