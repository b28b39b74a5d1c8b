"""Render a conversation with its chat template and label the tokens to train.

The masking rule (DESIGN.md): a token is trained iff it was emitted by an assistant
message after the shared prompt, i.e. the message's text and its end-of-turn marker.
Everything else (system, user, tool turns, role headers, BOS, the shared prompt) is -100.

Spans are found from the rendered text, never from token ids: render growing prefixes
of the conversation, each must extend the previous one, and the new suffix holds the
message. Characters map to tokens through the tokenizer's offsets; a token follows the
character that starts it. Every row is then self-checked, so a template that rewrites
earlier turns or glues a message to its neighbour gives a rejected row, not a wrong mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtdpo.preprocess.rows import RowError

IGNORE_INDEX = -100

# Seed mode: (user-turn start, end-of-turn) markers per template family, keyed by a token
# that identifies the family in the template. Gemma's are the original research code's.
SEED_MARKERS = {
    "<start_of_turn>": ("<start_of_turn>user\n", "<end_of_turn>\n"),
    "<|start_header_id|>": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "<|im_start|>": ("<|im_start|>user\n", "<|im_end|>\n"),
    "<|user|>": ("<|user|>\n", "<|end|>\n"),
    "[INST]": ("[INST]", "[/INST]"),
}


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class TrainedSpan:
    """Characters of one assistant message that are trained, and what the check needs."""

    start: int  # where the model starts generating (after the role header)
    end: int  # after the end-of-turn marker
    content_start: int
    content_end: int
    turn_end: int  # end of this message's rendered text; nothing past it may be trained


class ChatTemplate:
    """A tokenizer's chat template, rendered exactly as `apply_chat_template(tokenize=False)`
    does (transformers' own compiled, sandboxed Jinja template and variables) but without
    its per-call overhead, which dominates when every row renders several prefixes."""

    def __init__(self, tokenizer):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.tokenizer = tokenizer
        self.markers = end_markers(tokenizer)
        self._template = _compile_jinja_template(tokenizer.chat_template)
        self._variables = dict(tokenizer.special_tokens_map)
        self.generation_header = self._generation_header()

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        try:
            return self._template.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=generation_prompt, **self._variables
            )
        except Exception as err:  # the template's own error (raise_exception, bad roles …) is the reason
            raise RowError(f"chat template error: {err}") from None

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and character offsets. The template already emits BOS: adding special
        tokens again would double it."""
        enc = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, dtype=np.int64), np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)

    def _generation_header(self) -> str | None:
        """What add_generation_prompt appends (e.g. "<start_of_turn>model\n"), when it only appends."""
        probe = [{"role": "user", "content": "x"}]
        try:
            plain, prompted = self.render(probe), self.render(probe, generation_prompt=True)
        except RowError:
            return None
        return prompted[len(plain) :] if prompted.startswith(plain) else None


def end_markers(tokenizer) -> list[str]:
    """Special-token strings, longest first: the candidates for an end-of-turn marker."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(specials, key=len, reverse=True)


def render_and_mask(chat: ChatTemplate, messages: list[dict], n_prompt: int) -> Encoded:
    """Assistant mode: train the post-prompt assistant messages only."""
    text = chat.render(messages)
    spans = trained_spans(chat, messages, n_prompt, text)
    ids, offsets = chat.tokenize(text)
    trained = np.zeros(len(ids), dtype=bool)
    for span in spans:
        trained |= (offsets[:, 0] >= span.start) & (offsets[:, 0] < span.end)
    check_mask(offsets, trained, spans)
    labels = np.where(trained, ids, IGNORE_INDEX)
    return Encoded(ids.tolist(), labels.tolist())


def trained_spans(chat: ChatTemplate, messages, n_prompt, text) -> list[TrainedSpan]:
    turn_start = _prefix_length(chat, messages[:n_prompt], text) if n_prompt else 0
    spans = []
    for i in range(n_prompt, len(messages)):
        turn_end = _prefix_length(chat, messages[: i + 1], text)
        if messages[i]["role"] == "assistant":
            spans.append(_assistant_span(chat, messages, i, text, turn_start, turn_end))
        turn_start = turn_end
    return spans


def _prefix_length(chat: ChatTemplate, prefix, text) -> int:
    rendered = chat.render(prefix)
    if text.startswith(rendered):
        return len(rendered)
    # Some templates close every render with a special token (Phi-3 appends <|endoftext|>):
    # a prefix that differs from the whole only by that closing token is still stable.
    for closing in chat.markers:
        if rendered.endswith(closing) and text.endswith(closing) and text.startswith(rendered[: -len(closing)]):
            return len(rendered) - len(closing)
    raise RowError(
        f"chat template is not prefix-stable: the first {len(prefix)} messages render differently inside the "
        "whole conversation (the template rewrites earlier turns), so the mask cannot be trusted"
    )


def _assistant_span(chat: ChatTemplate, messages, i, text, turn_start, turn_end) -> TrainedSpan:
    content = messages[i]["content"]
    if not content.strip():
        raise RowError(f"message {i} (assistant) has empty content")
    turn = text[turn_start:turn_end]
    found = _locate(turn, content, chat.markers) or _locate(turn, content.strip(), chat.markers)  # templates may trim
    if found is None:
        raise RowError(f"message {i} (assistant): its text is not in the rendered template output (the template alters it)")
    content_start, content_end = turn_start + found[0], turn_start + found[1]
    marker = next((m for m in chat.markers if text.startswith(m, content_end, turn_end)), "")
    # The model generates everything after the generation prompt, e.g. Mistral's space
    # after [/INST]; use it as the start when it ends just before the content.
    start = content_start
    generation_end = _generation_end(chat, messages, i, text, turn_start)
    if generation_end is not None and turn_start <= generation_end <= content_start and not text[generation_end:content_start].strip():
        start = generation_end
    return TrainedSpan(start, content_end + len(marker), content_start, content_end, turn_end)


def _generation_end(chat: ChatTemplate, messages, i, text, turn_start) -> int | None:
    """Where the generation prompt for message i ends in `text`, if the template has one there."""
    if i == 0:
        return None
    header = chat.generation_header
    if header is not None and text.startswith(header, turn_start):  # the usual case: no extra render
        return turn_start + len(header)
    prompted = chat.render(messages[:i], generation_prompt=True)
    return len(prompted) if text.startswith(prompted) else None


def _locate(turn: str, needle: str, markers: list[str]) -> tuple[int, int] | None:
    """Last occurrence of needle that an end marker (or the turn's end) follows."""
    if not needle:
        return None
    hits, pos = [], turn.find(needle)
    while pos != -1:
        hits.append(pos)
        pos = turn.find(needle, pos + 1)
    if not hits:
        return None

    def closes_turn(p):
        rest = turn[p + len(needle) :]
        return not rest.strip() or any(rest.startswith(m) for m in markers)

    best = next((p for p in reversed(hits) if closes_turn(p)), hits[-1])
    return best, best + len(needle)


def check_mask(offsets: np.ndarray, trained: np.ndarray, spans: list[TrainedSpan]) -> None:
    """Self-check: every content character is trained, no trained token leaves its turn."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    for span in spans:
        overlaps = (starts < span.content_end) & (ends > span.content_start)
        if not trained[overlaps].all():
            raise RowError("assistant text shares a token with its role header; the mask would cut it")
        mine = trained & (starts >= span.start) & (starts < span.end)
        if (ends[mine] > span.turn_end).any():
            raise RowError("a trained token runs into the next message; the mask would train it")


def seed_mask(chat: ChatTemplate, messages: list[dict], n_prompt: int, user_marker: str, end_marker: str) -> Encoded:
    """The original research rule: mask the shared prompt and every span from a user-turn
    start marker through the next end-of-turn marker (both inclusive); train the rest.

    Markers are matched in the rendered text, not as token ids, so a marker whose first
    character merges into the previous token (Mistral's " [INST]") is still found; a token
    that overlaps a masked span is masked.
    """
    text = chat.render(messages)
    prompt = chat.render(messages[:n_prompt], generation_prompt=True) if n_prompt else ""
    if not text.startswith(prompt):
        prompt = chat.render(messages[:n_prompt])
    ids, offsets = chat.tokenize(text)
    starts, ends = offsets[:, 0], offsets[:, 1]
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


def seed_markers(chat_template: str) -> tuple[str, str] | None:
    return next((m for key, m in SEED_MARKERS.items() if key in chat_template), None)
