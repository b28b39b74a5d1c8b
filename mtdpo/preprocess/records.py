"""One raw row in, one cache record out: validate, render and mask both sides, truncate.

to_pair(row)            the row as two whole conversations and their shared prompt (rows.py)
mask_side(...)          render one side, find the trained spans (skeleton.py, else spans.py),
                        encode the text (tokens.py), self-check, label
truncate(...)           keep the start, cut the tail
"""

from __future__ import annotations

from dataclasses import dataclass

from mtdpo.cache import PairRecord, Sequence
from mtdpo.errors import UsageError
from mtdpo.preprocess.rows import Pair, RowError, to_pair
from mtdpo.preprocess.seed import seed_mask
from mtdpo.preprocess.skeleton import SkeletonCache
from mtdpo.preprocess.spans import TokenBounds, assistant_spans, check_spans, labels_for, trained_ranges
from mtdpo.preprocess.template import ChatTemplate
from mtdpo.preprocess.tokens import PrefixReusingEncoder, TokenSurfaces, common_prefix_length, reuse_rule


class Dropped(RowError):
    """A valid row that truncation left without a trained token on one side."""


MASK_MODES = ("assistant", "seed")  # seed: the original research rule (seed.py)


@dataclass(frozen=True)
class MaskOptions:
    mode: str = "assistant"
    max_length: int = 2048
    user_marker: str | None = None  # seed mode only
    end_marker: str | None = None

    def __post_init__(self):
        if self.mode not in MASK_MODES:
            raise UsageError(f"unknown --mask-mode {self.mode!r}; use {' or '.join(MASK_MODES)}")
        if self.max_length < 1:
            raise UsageError("--max-length must be at least 1")


class RecordBuilder:
    """`builder(n, row) -> (PairRecord, truncated)` for row number n, or RowError / Dropped."""

    def __init__(self, tokenizer, options: MaskOptions, one_render: bool = True):
        self.options = options
        self.chat = ChatTemplate(tokenizer)
        # A pair's shared prompt is encoded once; offsets are rebuilt where they can be (tokens.py).
        surfaces = TokenSurfaces(tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True), self.chat.markers)
        self.encoder = PrefixReusingEncoder(tokenizer, reuse_rule(tokenizer), surfaces)
        self.skeletons = SkeletonCache(self.chat) if one_render else None

    def __call__(self, n: int, row: object) -> tuple[PairRecord, bool]:
        pair = to_pair(row)
        chosen, rejected = self._mask(pair, pair.chosen), self._mask(pair, pair.rejected)
        if chosen.input_ids == rejected.input_ids:
            raise RowError("chosen and rejected render to the same tokens")
        limit = self.options.max_length
        truncated = max(len(chosen), len(rejected)) > limit
        chosen, rejected = truncate(chosen, limit), truncate(rejected, limit)
        for side, sequence in (("chosen", chosen), ("rejected", rejected)):
            if sequence.trained_tokens == 0:
                raise Dropped(f"{side} has no trained token left after truncation to --max-length {limit}")
        return PairRecord(chosen, rejected, common_prefix_length(chosen.input_ids, rejected.input_ids), n), truncated

    def _mask(self, pair: Pair, messages: list[dict]) -> Sequence:
        options = self.options
        if options.mode == "seed":
            markers = options.user_marker, options.end_marker
            return seed_mask(
                self.chat, self.encoder.encode, messages, pair.n_prompt, *markers, pair.tools, pair.template_kwargs
            )
        return self.mask_side(messages, pair.n_prompt, pair.tools, pair.template_kwargs)

    def mask_side(self, messages: list[dict], n_prompt: int, tools=None, template_kwargs=None) -> Sequence:
        """Assistant mode: train what the model generates for each post-prompt assistant message."""
        chat = self.chat
        render = chat.renderer(tools, template_kwargs)
        text = render(messages)
        spans = self.skeletons.spans(messages, n_prompt, text, tools, template_kwargs) if self.skeletons else None
        if spans is None:  # the prefix renders decide
            spans = assistant_spans(
                render, messages, n_prompt, text, chat.markers, chat.closing, chat.end_of_turn, chat.untokenized_end
            )
        tokens = self.encoder.encode(text)
        bounds = TokenBounds.of(tokens.starts, tokens.ends)
        check_spans(text, bounds, messages, spans)
        return Sequence(tokens.ids, labels_for(tokens.ids, trained_ranges(bounds.starts, spans)))


def truncate(sequence: Sequence, max_length: int) -> Sequence:
    """Keep the start, cut the tail (the shared prompt and first turns matter most)."""
    return Sequence(sequence.input_ids[:max_length], sequence.labels[:max_length])
