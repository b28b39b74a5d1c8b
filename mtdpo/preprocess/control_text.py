"""A control token's text inside a message, encoded as plain text (`--control-as-text`).

A message may hold the characters of a control token: `<|im_end|>` in a code sample, `</s>` in
HTML. The tokenizer would encode them as that token, and a turn would end or start inside a
turn, so by default such a row is rejected naming the token (records.py). With the option they
are encoded as ordinary text, the tokens a model writes when it writes those characters:

    hidden = control.hide(messages)     each occurrence in a message -> a same-length sentinel
    ...                                 render and find the trained spans as for any row
    text, ranges = control.reveal(s)    the sentinels back to the control text, and where they were
    tokens = control.encode(tokens, text, ranges)
                                        re-encode each stretch between the template's own added
                                        tokens that holds one, with special tokens read as text

Sentinels (private-use characters, one per control token, as many as the token has characters)
keep every offset of the render, so the masking rule and its self-check see the row exactly as
they would see it with the text. A row whose template escapes or cuts a sentinel, or whose
tokenizer cannot encode the text without the token (a control token that is not special), is
rejected with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from mtdpo.preprocess.rows import RowError
from mtdpo.preprocess.template import ControlTokens
from mtdpo.preprocess.tokens import Tokens

SENTINEL_BASE = 0xE000  # the Unicode private-use area: never in a template's own text


def message_texts(message: dict) -> Iterator[tuple[str, str]]:
    """(field, text) for every text of a message that a template writes into the conversation:
    content, reasoning_content and the strings inside each tool call's arguments."""
    for what in ("content", "reasoning_content"):
        if isinstance(text := message.get(what), str):
            yield what, text
    for k, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function", call) if isinstance(call, dict) else None
        if isinstance(function, dict):
            for text in _strings(function.get("arguments")):
                yield f"tool_calls[{k}] arguments", text


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


class ControlText:
    """Hide, reveal and plainly encode one template's control tokens (template.ControlTokens)."""

    def __init__(self, tokenizer, control_tokens: ControlTokens):
        self.backend = tokenizer.backend_tokenizer
        self.added_ids = frozenset(tokenizer.added_tokens_decoder)
        tokens = control_tokens.tokens
        self.sentinels = {chr(SENTINEL_BASE + i): token for i, token in enumerate(tokens)}  # one character each
        self._hidden = {token: char * len(token) for char, token in self.sentinels.items()}
        by_length = sorted(tokens, key=len, reverse=True)  # the longest match wins, as the tokenizer's
        self._token = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        self._sentinel = re.compile(f"[{''.join(self.sentinels)}]+") if self.sentinels else None
        self._escaped = re.compile("|".join(rf"\\u{ord(c):04x}" for c in self.sentinels), re.IGNORECASE)

    def hide(self, messages: list[dict]) -> list[dict] | None:
        """The messages with each control token's text replaced by its sentinel, or None when they
        hold none."""
        if self._token is None or not any(self._token.search(t) for m in messages for _, t in message_texts(m)):
            return None
        for m in messages:
            for what, text in message_texts(m):
                if self._sentinel.search(text):
                    raise RowError(
                        f"{what} holds private-use characters (U+{SENTINEL_BASE:04X}…) that --control-as-text "
                        "uses to mark control-token text: remove them or drop the option"
                    )
        return [self._hide_in_message(m) for m in messages]

    def _hide_in_message(self, message: dict) -> dict:
        out = {k: self._hide_in(v) if k in ("content", "reasoning_content") else v for k, v in message.items()}
        if calls := message.get("tool_calls"):
            out["tool_calls"] = [self._hide_in_call(call) for call in calls]
        return out

    def _hide_in_call(self, call):
        if not isinstance(call, dict):
            return call
        if isinstance(function := call.get("function"), dict):
            return {**call, "function": self._hide_in_call(function)}
        return {**call, "arguments": self._hide_in(call["arguments"])} if "arguments" in call else call

    def _hide_in(self, value):
        """`value` with the control text in every string inside it hidden."""
        if isinstance(value, str):
            return self._token.sub(lambda m: self._hidden[m.group()], value)
        if isinstance(value, dict):
            return {k: self._hide_in(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._hide_in(v) for v in value]
        return value

    def reveal(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """`text` with the control text back in place of each sentinel, and the character ranges
        it fills (the same offsets: a sentinel is as long as its token)."""
        if self._escaped.search(text):
            raise RowError("the chat template escapes the text of a control token: it cannot be encoded as plain text")
        pieces, ranges, position = [], [], 0
        for run in self._sentinel.finditer(text):
            pieces.append(text[position : run.start()])
            at = run.start()
            while at < run.end():
                token = self.sentinels[text[at]]
                if text[at : at + len(token)] != text[at] * len(token):
                    raise RowError(f"the chat template cuts the text of the control token {token!r} in a message")
                pieces.append(token)
                ranges.append((at, at + len(token)))
                at += len(token)
            position = run.end()
        pieces.append(text[position:])
        return "".join(pieces), ranges

    def encode(self, tokens: Tokens, text: str, ranges: list[tuple[int, int]]) -> Tokens:
        """`tokens` (the tokenizer's encoding of `text`) with every stretch between two of the
        template's own added tokens that holds a range encoded again, special tokens as text: the
        tokens the tokenizer gives that stretch when it does not split it at the control token."""
        if not ranges:
            return tokens
        ids, starts, ends = list(tokens.ids), list(tokens.starts), list(tokens.ends)
        # The template's own added tokens cut the text; a control token written in a message does not.
        cuts = [
            k
            for k, i in enumerate(ids)
            if i in self.added_ids and not any(a < ends[k] and starts[k] < b for a, b in ranges)
        ]
        out = Tokens([], [], [])
        previous = 0  # index of the first token after the last cut copied
        for k in [*cuts, len(ids)]:
            left = ends[previous - 1] if previous else 0
            right = starts[k] if k < len(ids) else len(text)
            if any(left <= a and b <= right for a, b in ranges):
                stretch = self._plain(text[left:right], left)
                _extend(out, stretch)
            else:
                _extend(out, Tokens(ids[previous:k], starts[previous:k], ends[previous:k]))
            if k < len(ids):
                _extend(out, Tokens([ids[k]], [starts[k]], [ends[k]]))
            previous = k + 1
        return out

    def _plain(self, text: str, shift: int) -> Tokens:
        self.backend.encode_special_tokens = True
        try:
            plain = Tokens.of(self.backend.encode(text, add_special_tokens=False), shift)
        finally:
            self.backend.encode_special_tokens = False
        if (found := next((i for i in plain.ids if i in self.added_ids), None)) is not None:
            token = self.backend.id_to_token(found)
            raise RowError(f"the tokenizer encodes {token!r} as its token even as text (it is not a special token)")
        return plain


def _extend(tokens: Tokens, more: Tokens) -> None:
    tokens.ids.extend(more.ids)
    tokens.starts.extend(more.starts)
    tokens.ends.extend(more.ends)
