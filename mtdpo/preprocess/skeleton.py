"""The rule's spans from one render of the conversation's shape (a cache in front of spans.py).

A conversation of plain-text messages renders, for most templates, as fixed template text around
each content. So each shape (roles, prompt length, tools, template arguments) is rendered once
with placeholder contents; its spans are found there by spans.py's own rule; and a row whose real
render equals that skeleton with its contents filled in, byte for byte, takes its spans from the
skeleton: one render per side instead of two more per assistant turn. Any other row returns
None, and the prefix renders decide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mtdpo.preprocess.rows import RowError
from mtdpo.preprocess.spans import TurnSpan, generation_turns, sequences
from mtdpo.preprocess.template import ChatTemplate

PLACEHOLDER = "\ue000{}\ue001"  # private-use characters around the message's index
MAX_SKELETONS = 4096  # shapes kept per template (roles, prompt length, tools, template arguments)


@dataclass(frozen=True)
class Skeleton:
    """A conversation shape rendered once with placeholder contents: the template's own text
    around each content, and each span boundary as (piece index, offset in that piece)."""

    pieces: list[str]  # text before content 0, between contents 0 and 1, …, after the last
    spans: list[tuple[int, tuple[int, int], tuple[int, int]]]  # message, start, end


class SkeletonCache:
    """Skeletons of the shapes seen so far, for one template (bounded: cleared when full)."""

    def __init__(self, chat: ChatTemplate):
        self.chat = chat
        self.skeletons: dict[tuple, Skeleton | None] = {}

    def spans(self, messages: list[dict], n_prompt: int, text: str, tools, template_kwargs) -> list[TurnSpan] | None:
        """The rule's spans for a row whose real render `text` equals its shape's skeleton with the
        real contents filled in, byte for byte; None for any other row (the prefix renders decide).

        Only messages of plain text ({"role", "content"}) qualify: tool calls and reasoning vary
        per row and are rendered by the slow path. The skeleton's spans come from the rule's own
        renders of the skeleton's prefixes; a shape where the rule needs a fallback gets none.
        """
        if any(len(m) != 2 or not isinstance(m.get("content"), str) for m in messages):
            return None
        if any(m["role"] == "assistant" and not m["content"].strip() for m in messages[n_prompt:]):
            return None  # the slow path says why the row is unusable
        key = (tuple(m["role"] for m in messages), n_prompt, _key(tools), _key(template_kwargs))
        if key not in self.skeletons:
            if len(self.skeletons) >= MAX_SKELETONS:
                self.skeletons.clear()
            self.skeletons[key] = render_skeleton(self.chat, key[0], n_prompt, tools, template_kwargs)
        skeleton = self.skeletons[key]
        return None if skeleton is None else fill(skeleton, messages, text)


def fill(skeleton: Skeleton, messages: list[dict], text: str) -> list[TurnSpan] | None:
    """The skeleton's spans moved to the real contents, if the filled skeleton is `text`."""
    starts, filled, length = [], [], 0  # where each piece starts in the real text
    for piece, message in zip(skeleton.pieces, [*messages, None]):
        starts.append(length)
        filled.append(piece)
        length += len(piece)
        if message is not None:
            filled.append(message["content"])
            length += len(message["content"])
    if "".join(filled) != text:
        return None

    def real(at: tuple[int, int]) -> int:
        return starts[at[0]] + at[1]

    return [TurnSpan(i, real(start), real(end)) for i, start, end in skeleton.spans]


def render_skeleton(
    chat: ChatTemplate, roles: tuple[str, ...], n_prompt: int, tools, template_kwargs
) -> Skeleton | None:
    """Render a shape with placeholder contents and find its spans by the rule itself; only a
    prefix-stable shape (one sequence: the whole render) gets a skeleton."""
    render = chat.renderer(tools, template_kwargs)
    messages = [{"role": role, "content": PLACEHOLDER.format(k)} for k, role in enumerate(roles)]
    try:
        text = render(messages)
        pieces, cut, bounds = [], 0, []  # bounds: [start, end) of each placeholder in the text
        for message in messages:
            at = text.find(message["content"], cut)
            if at == -1 or text.count(message["content"]) != 1:
                return None  # the template drops, repeats or rewrites a content
            pieces.append(text[cut:at])
            bounds.append((at, at + len(message["content"])))
            cut = bounds[-1][1]
        pieces.append(text[cut:])

        def piece_of(position: int) -> tuple[int, int] | None:
            before = [k for k, (_, stop) in enumerate(bounds) if stop <= position]
            k = len(before)  # the piece after the last placeholder that ends at or before position
            if k < len(bounds) and position > bounds[k][0]:
                return None  # inside a content: not a boundary the template owns
            return k, position - (bounds[k - 1][1] if k else 0)

        groups = sequences(generation_turns(chat, render, messages, n_prompt, text), text)
        if len(groups) != 1 or groups[0].text != text:
            return None  # not prefix-stable: the prefix renders decide each row
        spans = []
        for span in groups[0].spans:
            where = [piece_of(span.start), piece_of(span.end)]
            if None in where:
                return None
            spans.append((span.message, *where))
    except RowError:
        return None
    return Skeleton(pieces, spans)


def _key(value) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)
