"""Render a conversation with its chat template and label the tokens to train.

The masking rule (docs/DESIGN.md): for each assistant message i after the shared prompt, the
trained characters are exactly what the model generates for that turn: from the end of
the generation prompt, `render(messages[:i], add_generation_prompt=True)`, through the
turn's end-of-turn marker inclusive (content, reasoning, tool-call text and the marker),
not the template's whitespace after the marker. Everything else (system, user and tool
turns, tool schemas, role headers, BOS, the shared prompt) is -100.

Three small pure steps, all on the rendered text, never on token ids:

    assistant_spans(render, messages, n_prompt, text, ...)  -> one TurnSpan per trained message
    trained_ranges(token starts, spans)                     -> which tokens are trained
    check_spans(text, token bounds, messages, spans)        -> RowError unless the mask is right

A span's end comes from rendering the conversation up to and including the message (for a
template that renders the last message differently, Qwen3's empty `<think>` block, from one
message further); a token follows the character that starts it. Only where a template's generation prompt is
not a prefix of the conversation (it appends text the conversation never renders) is the
start found by locating the content string instead. The self-check rejects a row whose
span does not hold the message's content, reasoning and every tool call's name and
arguments, or whose span boundaries cut a token: the mask is right or the row is not used.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

import numpy as np
from jinja2.runtime import new_context

from mtdpo.cache import IGNORE_INDEX
from mtdpo.preprocess.rows import RowError
from mtdpo.preprocess.tokens import PrefixReusingEncoder, Tokens, TokenSurfaces, common_prefix_length, reuse_rule

# Replaces a message's content to see where its render starts to depend on it.
STAND_IN = "\x00mtdpo stand-in\x00"
# A render of the conversation so far: (messages, add_generation_prompt) -> text.
Render = Callable[[list, bool], str]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class TurnSpan:
    """The trained characters [start, end) of one assistant message, in the rendered text."""

    message: int  # index of the message in the conversation
    header_end: int  # where the template's generation prompt for it ends in the text
    start: int  # where training starts: header_end, unless the content had to be located
    end: int  # just after the end-of-turn marker
    turn_end: int  # end of the message's render (end + the template's whitespace after it)


class ChatTemplate:
    """A tokenizer's chat template, rendered exactly as `apply_chat_template(tokenize=False)`
    does (transformers' own compiled, sandboxed Jinja template and variables) but without
    its per-call overhead, which dominates when every row renders several prefixes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.markers = end_markers(tokenizer)
        self._template = compile_template(tokenizer.chat_template)
        # Every call's variables over the template's globals, as Template.render merges them, but
        # with the globals (a ChainMap, which dict() walks in Python) flattened once, not per call.
        self._globals = dict(self._template.globals)
        self._variables = {**self._globals, **tokenizer.special_tokens_map}
        # The pair's shared prompt encoded once; offsets rebuilt where they can be (tokens.py).
        surfaces = TokenSurfaces(tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True), self.markers)
        self.encoder = PrefixReusingEncoder(tokenizer, reuse_rule(tokenizer), surfaces)
        self.closing = self._closing()
        self.end_of_turn = self._end_of_turn()
        self.skeletons: dict[tuple, Skeleton | None] = {}  # conversation shape -> its one render

    def render(self, messages: list[dict], generation_prompt: bool = False, tools=None, template_kwargs=None) -> str:
        """`Template.render(messages=..., tools=..., documents=None, add_generation_prompt=...,
        **special tokens, **template_kwargs)`: the same text and errors, 31 µs where it takes 43."""
        template = self._template
        variables = {**self._variables, **template_kwargs} if template_kwargs else dict(self._variables)
        variables.update(messages=messages, tools=tools, documents=None, add_generation_prompt=generation_prompt)
        try:
            context = new_context(
                template.environment, template.name, template.blocks, variables, shared=True, globals=self._globals
            )
            return template.environment.concat(template.root_render_func(context))
        except Exception as err:  # the template's own error (raise_exception, bad roles …) is the reason
            raise RowError(f"chat template error: {err}") from None

    def renderer(self, tools=None, template_kwargs=None) -> Render:
        """`render` bound to one row's tools and template arguments."""
        return lambda messages, generation_prompt=False: self.render(
            messages, generation_prompt, tools, template_kwargs
        )

    def tokenize(self, text: str) -> Tokens:
        """Token ids and where each token starts and ends, as the tokenizer encodes the whole
        text; the prefix this text shares with the previous one (a pair's prompt) is not
        encoded twice (tokens.py). The template already emits BOS: adding special tokens
        again would double it."""
        return self.encoder.encode(text)

    def _closing(self) -> str:
        """A token the template appends to every render and the next message replaces
        (Phi-3 closes each render with <|endoftext|>): not part of the last message."""
        one, two = (
            [{"role": "user", "content": "x"}],
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        )
        try:
            short, long = self.render(one), self.render(two)
        except RowError:
            return ""
        return next(
            (m for m in self.markers if short.endswith(m) and long.endswith(m) and not long.startswith(short)), ""
        )

    def _end_of_turn(self) -> str:
        """The marker that closes an assistant turn (`<|im_end|>`, `<end_of_turn>` …), from a probe."""
        two = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        try:
            rendered = self.render(two)
        except RowError:
            return ""
        body = (
            rendered[: -len(self.closing)] if self.closing and rendered.endswith(self.closing) else rendered
        ).rstrip()
        return next((m for m in self.markers if body.endswith(m)), "")


@lru_cache(maxsize=8)
def compile_template(source: str):
    """The template compiled as transformers compiles it, with memoized attribute checks: our
    own copy, not transformers' shared one. Cached, so the up-front syntax check
    (mtdpo.tokenizer) and ChatTemplate compile it once (20 ms for a small template)."""
    from transformers.utils.chat_template_utils import _cached_compile_jinja_template

    template = _cached_compile_jinja_template(source)
    memoize_attribute_checks(template.environment)
    return template


def memoize_attribute_checks(environment) -> None:
    """Jinja's immutable sandbox asks `is_safe_attribute(obj, attr, value)` at every attribute
    access in a template (a third of a render). Its answer depends only on type(obj) and attr
    (isinstance tests and name lists), so it is asked once per (type, attr): the same
    decisions, the same errors, at a dict lookup's cost."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if type(environment).is_safe_attribute is not ImmutableSandboxedEnvironment.is_safe_attribute:
        return  # a sandbox whose rule may depend on the value: ask every time
    ask, known = environment.is_safe_attribute, {}

    def is_safe_attribute(obj, attr: str, value) -> bool:
        key = (type(obj), attr)
        if key not in known:
            known[key] = ask(obj, attr, value)
        return known[key]

    environment.is_safe_attribute = is_safe_attribute


def end_markers(tokenizer) -> tuple[str, ...]:
    """Added-token strings (special or not), longest first: the candidates for an end-of-turn
    marker. A tuple, so `str.endswith(markers)` tests them all at C speed (Gemma 3 has 6k)."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    return tuple(sorted(added, key=len, reverse=True))


def render_and_mask(
    chat: ChatTemplate, messages: list[dict], n_prompt: int, tools=None, template_kwargs=None
) -> Encoded:
    """Assistant mode: train what the model generates for each post-prompt assistant message."""
    render = chat.renderer(tools, template_kwargs)
    text = render(messages)
    spans = skeleton_spans(chat, messages, n_prompt, text, tools, template_kwargs) if ONE_RENDER else None
    if spans is None:  # the prefix renders decide
        spans = assistant_spans(render, messages, n_prompt, text, chat.markers, chat.closing, chat.end_of_turn)
    encoded = chat.tokenize(text)
    tokens = TokenBounds.of(encoded.starts, encoded.ends)
    check_spans(text, tokens, messages, spans)
    return Encoded(encoded.ids, labels_for(encoded.ids, trained_ranges(tokens.starts, spans)))


# ── the rule: render → character spans ───────────────────────────────────────


def assistant_spans(
    render: Render,
    messages: list[dict],
    n_prompt: int,
    text: str,
    markers: tuple[str, ...],
    closing: str = "",
    end_of_turn_marker: str = "",
) -> list[TurnSpan]:
    """One span per assistant message after the shared prompt, from renders of prefixes."""
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
        spans.append(TurnSpan(i, header_end, start, end_of_turn(text, start, turn_end, markers, i), turn_end))
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


def end_of_turn(text: str, start: int, turn_end: int, markers: tuple[str, ...], i: int) -> int:
    """The end of the turn's end-of-turn marker: the template's whitespace after it is not trained."""
    body = text[start:turn_end].rstrip()
    if not body.endswith(markers):
        raise RowError(
            f"message {i} (assistant): the template closes it with no end-of-turn token (it ends {body[-30:]!r})"
        )
    return start + len(body)


# ── the same spans from one render of the conversation's shape ───────────────

# On: rows whose render equals their shape's filled skeleton take their spans from it (one
# render per side instead of two more per assistant turn). Off: prefix renders for every row.
ONE_RENDER = True
PLACEHOLDER = "\ue000{}\ue001"  # private-use characters around the message's index
MAX_SKELETONS = 4096  # shapes kept per template (roles, prompt length, tools, template arguments)


@dataclass(frozen=True)
class Skeleton:
    """A conversation shape rendered once with placeholder contents: the template's own text
    around each content, and each span boundary as (piece index, offset in that piece)."""

    pieces: list[str]  # text before content 0, between contents 0 and 1, …, after the last
    spans: list[tuple[int, tuple[int, int], tuple[int, int], tuple[int, int]]]  # message, start, end, turn end


def skeleton_spans(
    chat: ChatTemplate, messages: list[dict], n_prompt: int, text: str, tools, template_kwargs
) -> list[TurnSpan] | None:
    """The rule's spans for a row whose real render `text` equals its shape's skeleton with the
    real contents filled in, byte for byte; None for any other row (the prefix renders decide).

    Only messages of plain text ({"role", "content"}) qualify: tool calls and reasoning vary per
    row and are rendered by the slow path. The skeleton's spans come from the rule's own
    renders of the skeleton's prefixes; a shape where the rule needs a fallback gets no skeleton.
    """
    if any(len(m) != 2 or not isinstance(m.get("content"), str) for m in messages):
        return None
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages[n_prompt:]):
        return None  # the slow path says why the row is unusable
    key = (tuple(m["role"] for m in messages), n_prompt, _key(tools), _key(template_kwargs))
    if key not in chat.skeletons:
        if len(chat.skeletons) >= MAX_SKELETONS:
            chat.skeletons.clear()
        chat.skeletons[key] = render_skeleton(chat, key[0], n_prompt, tools, template_kwargs)
    skeleton = chat.skeletons[key]
    if skeleton is None:
        return None
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

    return [
        TurnSpan(i, real(start), real(start), real(end), real(turn_end)) for i, start, end, turn_end in skeleton.spans
    ]


def render_skeleton(
    chat: ChatTemplate, roles: tuple[str, ...], n_prompt: int, tools, template_kwargs
) -> Skeleton | None:
    """Render a shape with placeholder contents and find its spans by the rule's main path:
    every prefix stable, each generation prompt a prefix of the conversation."""
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

        spans = []
        for i in range(n_prompt, len(messages)):
            if roles[i] != "assistant":
                continue
            turn_end = prefix_end(
                text if i + 1 == len(messages) else render(messages[: i + 1]), text, chat.closing, i + 1
            )
            prompted = render(messages[:i], True)
            if not text.startswith(prompted) or len(prompted) > turn_end:
                return None
            end = end_of_turn(text, len(prompted), turn_end, chat.markers, i)
            where = [piece_of(len(prompted)), piece_of(end), piece_of(turn_end)]
            if None in where:
                return None
            spans.append((i, *where))
    except RowError:
        return None
    return Skeleton(pieces, spans)


def _key(value) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


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


# ── seed mode: the original research rule ────────────────────────────────────


def seed_mask(
    chat: ChatTemplate,
    messages: list[dict],
    n_prompt: int,
    user_marker: str,
    end_marker: str,
    tools=None,
    template_kwargs=None,
) -> Encoded:
    """The original research rule: mask the shared prompt and every span from a user-turn
    start marker through the next end-of-turn marker (both inclusive); train the rest.

    Markers are matched in the rendered text, not as token ids, so a marker whose first
    character merges into the previous token (Mistral's " [INST]") is still found; a token
    that overlaps a masked span is masked.
    """
    render = chat.renderer(tools, template_kwargs)
    text = render(messages)
    prompt = render(messages[:n_prompt], True) if n_prompt else ""
    if not text.startswith(prompt):
        prompt = render(messages[:n_prompt])
    encoded = chat.tokenize(text)
    ids, starts, ends = (np.asarray(x, dtype=np.int64) for x in encoded)
    masked = starts < len(prompt)
    for start, stop in marker_spans(text, user_marker, end_marker):
        masked |= (starts < stop) & (ends > start)
    return Encoded(ids.tolist(), np.where(masked, IGNORE_INDEX, ids).tolist())


def marker_spans(text: str, open_marker: str, close_marker: str) -> list[tuple[int, int]]:
    """Character ranges [start, stop) from each open marker through the next close marker."""
    spans, i = [], 0
    while (start := text.find(open_marker, i)) != -1:
        close = text.find(close_marker, start + len(open_marker))
        stop = len(text) if close == -1 else close + len(close_marker)
        spans.append((start, stop))
        i = stop
    return spans
