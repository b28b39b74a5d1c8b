"""`--mask-mode seed`: the original research code's rule, kept for reproduction and comparison.

Mask the shared prompt and every span from a user-turn start marker through the next
end-of-turn marker (both inclusive); train the rest (so later assistant headers are trained).
The markers come from the template family (mtdpo/families.py) or the command line.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mtdpo.cache import IGNORE_INDEX, Sequence
from mtdpo.errors import UsageError
from mtdpo.families import detect_family
from mtdpo.preprocess.template import ChatTemplate
from mtdpo.preprocess.tokens import Tokens


def seed_mask(
    chat: ChatTemplate,
    encode: Callable[[str], Tokens],
    messages: list[dict],
    n_prompt: int,
    user_marker: str,
    end_marker: str,
    tools=None,
    template_kwargs=None,
) -> Sequence:
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
    encoded = encode(text)
    ids, starts, ends = (np.asarray(x, dtype=np.int64) for x in encoded)
    masked = starts < len(prompt)
    for start, stop in marker_spans(text, user_marker, end_marker):
        masked |= (starts < stop) & (ends > start)
    return Sequence(ids.tolist(), np.where(masked, IGNORE_INDEX, ids).tolist())


def marker_spans(text: str, open_marker: str, close_marker: str) -> list[tuple[int, int]]:
    """Character ranges [start, stop) from each open marker through the next close marker."""
    spans, i = [], 0
    while (start := text.find(open_marker, i)) != -1:
        close = text.find(close_marker, start + len(open_marker))
        stop = len(text) if close == -1 else close + len(close_marker)
        spans.append((start, stop))
        i = stop
    return spans


def resolve_seed_markers(user_marker: str | None, end_marker: str | None, template: str) -> tuple[str, str]:
    """The markers given, or the template family's (the original research code's, for Gemma)."""
    if user_marker and end_marker:
        return user_marker, end_marker
    family = detect_family(template)
    if family is None or family.seed_markers is None:
        raise UsageError("--mask-mode seed: unknown template family; pass --user-marker and --end-marker")
    user, end = family.seed_markers
    return user_marker or user, end_marker or end
