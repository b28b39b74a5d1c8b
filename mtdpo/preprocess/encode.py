"""One raw row in, one schema-1 record out: validate, render + mask both sides, truncate."""

from __future__ import annotations

from dataclasses import dataclass

from mtdpo.cache import IGNORE_INDEX
from mtdpo.preprocess.mask import ChatTemplate, Encoded, render_and_mask, seed_mask
from mtdpo.preprocess.rows import Pair, RowError, to_pair
from mtdpo.preprocess.tokens import common_prefix_length


class Dropped(RowError):
    """A valid row that truncation left without a trained token on one side."""


@dataclass(frozen=True)
class MaskOptions:
    mode: str = "assistant"  # or "seed": the original research rule
    max_length: int = 2048
    user_marker: str | None = None  # seed mode only
    end_marker: str | None = None


class PairEncoder:
    def __init__(self, tokenizer, options: MaskOptions):
        self.options = options
        self.chat = ChatTemplate(tokenizer)

    def __call__(self, row: object) -> tuple[dict, bool]:
        """Return the record and whether it was truncated; raise RowError/Dropped."""
        pair = to_pair(row)
        chosen, rejected = self._mask(pair, pair.chosen), self._mask(pair, pair.rejected)
        if chosen.input_ids == rejected.input_ids:
            raise RowError("chosen and rejected render to the same tokens")
        limit = self.options.max_length
        truncated = max(len(chosen.input_ids), len(rejected.input_ids)) > limit
        chosen, rejected = truncate(chosen, limit), truncate(rejected, limit)
        for side, enc in (("chosen", chosen), ("rejected", rejected)):
            if enc.labels.count(IGNORE_INDEX) == len(enc.labels):  # counted in C, not a Python loop
                raise Dropped(f"{side} has no trained token left after truncation to --max-length {limit}")
        record = {
            "chosen_input_ids": chosen.input_ids,
            "chosen_labels": chosen.labels,
            "rejected_input_ids": rejected.input_ids,
            "rejected_labels": rejected.labels,
            "prompt_len": common_prefix_length(chosen.input_ids, rejected.input_ids),
            "chosen_len": len(chosen.input_ids),
            "rejected_len": len(rejected.input_ids),
        }
        return record, truncated

    def _mask(self, pair: Pair, messages: list[dict]) -> Encoded:
        if self.options.mode == "seed":
            options = self.options
            return seed_mask(
                self.chat,
                messages,
                pair.n_prompt,
                options.user_marker,
                options.end_marker,
                pair.tools,
                pair.template_kwargs,
            )
        return render_and_mask(self.chat, messages, pair.n_prompt, pair.tools, pair.template_kwargs)


def truncate(enc: Encoded, max_length: int) -> Encoded:
    """Keep the start, cut the tail (the shared prompt and first turns matter most)."""
    return Encoded(enc.input_ids[:max_length], enc.labels[:max_length])
