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


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # the template's own error (raise_exception, bad roles …) is the reason
        raise RowError(f"chat template error: {err}") from None


def end_markers(tokenizer) -> list[str]:
    """Special-token strings, longest first: the candidates for an end-of-turn marker."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(specials, key=len, reverse=True)


def render_and_mask(tokenizer, messages: list[dict], n_prompt: int, markers: list[str]) -> Encoded:
    """Assistant mode: train the post-prompt assistant messages only."""
    text = render(tokenizer, messages)
    spans = trained_spans(tokenizer, messages, n_prompt, text, markers)
    ids, offsets = _tokenize(tokenizer, text)
    trained = np.zeros(len(ids), dtype=bool)
    for span in spans:
        trained |= (offsets[:, 0] >= span.start) & (offsets[:, 0] < span.end)
    check_mask(offsets, trained, spans)
    labels = np.where(trained, ids, IGNORE_INDEX)
    return Encoded(ids.tolist(), labels.tolist())


def trained_spans(tokenizer, messages, n_prompt, text, markers) -> list[TrainedSpan]:
    turn_start = _prefix_length(tokenizer, messages[:n_prompt], text, n_prompt, markers) if n_prompt else 0
    spans = []
    for i in range(n_prompt, len(messages)):
        turn_end = _prefix_length(tokenizer, messages[: i + 1], text, i + 1, markers)
        if messages[i]["role"] == "assistant":
            spans.append(_assistant_span(tokenizer, messages, i, text, turn_start, turn_end, markers))
        turn_start = turn_end
    return spans


def _prefix_length(tokenizer, prefix, text, n, markers) -> int:
    rendered = render(tokenizer, prefix)
    if text.startswith(rendered):
        return len(rendered)
    # Some templates close every render with a special token (Phi-3 appends <|endoftext|>):
    # a prefix that differs from the whole only by that closing token is still stable.
    for closing in markers:
        if rendered.endswith(closing) and text.endswith(closing) and text.startswith(rendered[: -len(closing)]):
            return len(rendered) - len(closing)
    raise RowError(
            f"chat template is not prefix-stable: the first {n} messages render differently inside the "
            "whole conversation (the template rewrites earlier turns), so the mask cannot be trusted"
        )


def _assistant_span(tokenizer, messages, i, text, turn_start, turn_end, markers) -> TrainedSpan:
    content = messages[i]["content"]
    if not content.strip():
        raise RowError(f"message {i} (assistant) has empty content")
    turn = text[turn_start:turn_end]
    found = _locate(turn, content, markers) or _locate(turn, content.strip(), markers)  # templates may trim
    if found is None:
        raise RowError(f"message {i} (assistant): its text is not in the rendered template output (the template alters it)")
    content_start, content_end = turn_start + found[0], turn_start + found[1]
    marker = next((m for m in markers if text.startswith(m, content_end, turn_end)), "")
    # The model generates everything after the generation prompt, e.g. Mistral's space
    # after [/INST]; use it as the start when it ends just before the content.
    start = content_start
    gen = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
    if gen and turn_start <= len(gen) <= content_start and text.startswith(gen) and not text[len(gen) : content_start].strip():
        start = len(gen)
    return TrainedSpan(start, content_end + len(marker), content_start, content_end, turn_end)


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


def seed_mask(tokenizer, messages: list[dict], n_prompt: int, user_marker: str, end_marker: str) -> Encoded:
    """The original research rule: mask the shared prompt and every span from a user-turn
    start marker through the next end-of-turn marker (both inclusive); train the rest.

    Markers are matched in the rendered text, not as token ids, so a marker whose first
    character merges into the previous token (Mistral's " [INST]") is still found; a token
    that overlaps a masked span is masked.
    """
    text = render(tokenizer, messages)
    prompt = render(tokenizer, messages[:n_prompt], generation_prompt=True) if n_prompt else ""
    if not text.startswith(prompt):
        prompt = render(tokenizer, messages[:n_prompt])
    ids, offsets = _tokenize(tokenizer, text)
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


def _tokenize(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    # The template already emits BOS: adding special tokens again would double it.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return ids, offsets
