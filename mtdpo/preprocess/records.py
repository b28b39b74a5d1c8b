"""One raw row in, one cache record out: validate, render and mask both sides, truncate.

to_pair(row)            the row as two whole conversations and their shared prompt (rows.py)
                        (KtoRecordBuilder: to_unpaired(row), one labelled conversation)
mask_side(...)          render one side, find its trained turns in their generation contexts
                        (skeleton.py, else spans.py), encode each sequence (tokens.py),
                        self-check, label
truncate(...)           keep the start of each sequence, cut the tail
"""

from __future__ import annotations

from dataclasses import dataclass

from mtdpo.cache import KTO, PAIR, KtoRecord, PairRecord, Sequence
from mtdpo.cache.schema import first_trained
from mtdpo.errors import UsageError
from mtdpo.preprocess.control_text import ControlText, message_texts
from mtdpo.preprocess.rows import Pair, RowError, Unpaired, problem_key, row_kind, to_pair, to_unpaired
from mtdpo.preprocess.seed import seed_mask
from mtdpo.preprocess.skeleton import SkeletonCache
from mtdpo.preprocess.spans import (
    SequenceText,
    TokenBounds,
    check_spans,
    generation_turns,
    labels_for,
    sequences,
    trained_ranges,
)
from mtdpo.preprocess.template import ChatTemplate
from mtdpo.preprocess.tokens import PrefixReusingEncoder, TokenSurfaces, common_prefix_length, reuse_rule


class Dropped(RowError):
    """A valid row that truncation left without a trained token on one side."""


class OtherKind(RowError):
    """A row of the other record kind (a pair in a file of unpaired rows, or the reverse): a cache
    holds one kind, so preprocess stops at the first such row (pipeline.py)."""


MASK_MODES = ("assistant", "seed")
# The start of the reason of a row the template cannot render for want of tool support (the
# summary groups reasons by it, pipeline._reason_kind).
NO_TOOL_SUPPORT = "the chat template has no tool support (--tools-as-text writes tool calls and results as text)"  # seed: the original research rule (seed.py)


@dataclass(frozen=True)
class MaskOptions:
    mode: str = "assistant"
    max_length: int = 2048
    user_marker: str | None = None  # seed mode only
    end_marker: str | None = None
    string_arguments: bool = False  # keep tool-call arguments given as JSON strings as strings
    tools_as_text: bool = False  # write tool calls, results and schemas as text (text_tools.py)
    control_as_text: bool = False  # encode a control token's text in a message as text (control_text.py)

    def __post_init__(self):
        if self.mode not in MASK_MODES:
            raise UsageError(f"unknown --mask-mode {self.mode!r}; use {' or '.join(MASK_MODES)}")
        if self.control_as_text and self.mode != "assistant":
            raise UsageError("--control-as-text works with --mask-mode assistant only")
        if self.max_length < 1:
            raise UsageError("--max-length must be at least 1")


class RecordBuilder:
    """`builder(n, row) -> (PairRecord, truncated)` for row number n, or RowError / Dropped."""

    kind = PAIR

    def __init__(self, tokenizer, options: MaskOptions, one_render: bool = True):
        self.options = options
        self.chat = ChatTemplate(tokenizer)
        # A pair's shared prompt is encoded once; offsets are rebuilt where they can be (tokens.py).
        surfaces = TokenSurfaces(tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True), self.chat.markers)
        self.encoder = PrefixReusingEncoder(tokenizer, reuse_rule(tokenizer), surfaces)
        self.skeletons = SkeletonCache(self.chat) if one_render else None
        self.control_text = ControlText(tokenizer, self.chat.control_tokens) if options.control_as_text else None

    def __call__(self, n: int, row: object) -> tuple[PairRecord, bool]:
        pair, (chosen, rejected) = self.parse_and_mask(row)
        if chosen.input_ids == rejected.input_ids:
            raise RowError("chosen and rejected render to the same tokens")
        limit = self.options.max_length
        truncated = any(len(piece) > limit for side in (chosen, rejected) for piece in side.pieces())
        chosen, rejected = truncate(chosen, limit), truncate(rejected, limit)
        for side, sequence in (("chosen", chosen), ("rejected", rejected)):
            if sequence.trained_tokens == 0:
                raise Dropped(f"{side} has no trained token left after truncation to --max-length {limit}")
        prompt_len = common_prefix_length(chosen.pieces()[0].input_ids, rejected.pieces()[0].input_ids)
        problem = problem_key(pair.chosen, pair.tools, pair.template_kwargs)
        return PairRecord(chosen, rejected, prompt_len, n, problem=problem), truncated

    def parse(self, row: object, tools_as_text: bool) -> Pair:
        pair = to_pair(row, self.options.string_arguments, tools_as_text)
        self.refuse_control_text(pair)
        return pair

    def mask_all(self, pair: Pair) -> list[Sequence]:
        return [self._mask(pair, pair.chosen), self._mask(pair, pair.rejected)]

    def parse_and_mask(self, row: object) -> tuple[Pair, list[Sequence]]:
        """The row parsed and its sequences masked; a row rejected for want of the template's tool
        support (a template that never names a tool) says so, naming --tools-as-text."""
        parsed = self.parse(row, self.options.tools_as_text)
        try:
            return parsed, self.mask_all(parsed)
        except RowError as err:
            if self.options.tools_as_text or self.chat.has_tool_support or not self.renders_as_text(row, parsed):
                raise
            raise RowError(f"{NO_TOOL_SUPPORT}: {err}") from None

    def renders_as_text(self, row: object, parsed: Pair) -> bool:
        """Whether a row the template could not render as given renders once its tool calls,
        results and schemas are text: then the missing tool support is the cause (another
        fault, such as a system role the template refuses, stays the reason). Asked of rejected rows only."""
        try:
            as_text = self.parse(row, tools_as_text=True)
            if as_text == parsed:  # no tool in the row
                return False
            self.mask_all(as_text)
        except RowError:
            return False
        return True

    def refuse_control_text(self, pair: Pair) -> None:
        """A message whose text holds a control token's text would be encoded as that token (unless
        --control-as-text encodes it as text)."""
        for side, messages in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            self.refuse_control_text_in(side, messages)

    def refuse_control_text_in(self, side: str, messages: list[dict]) -> None:
        if self.options.control_as_text:
            return
        for k, message in enumerate(messages):
            for what, text in message_texts(message):
                if token := self.chat.control_tokens.find(text):
                    raise RowError(
                        f"{side}[{k}] {what} holds the text of the control token {token!r}, which the tokenizer "
                        "would encode as that token: remove or escape it, or pass --control-as-text"
                    )

    def check_kind(self, row: object) -> None:
        """Refuse a row whose keys make it a record of the other kind."""
        if (kind := row_kind(row)) not in (None, self.kind):
            shape = "a pair (chosen/rejected)" if kind == PAIR else "an unpaired row (label, messages or completion)"
            raise OtherKind(f"{shape} in a file of {'pairs' if self.kind == PAIR else 'unpaired rows'}")

    def _mask(self, pair: Pair, messages: list[dict]) -> Sequence:
        options = self.options
        if options.mode == "seed":
            markers = options.user_marker, options.end_marker
            return seed_mask(
                self.chat, self.encoder.encode, messages, pair.n_prompt, *markers, pair.tools, pair.template_kwargs
            )
        return self.mask_side(messages, pair.n_prompt, pair.tools, pair.template_kwargs)

    def mask_side(self, messages: list[dict], n_prompt: int, tools=None, template_kwargs=None) -> Sequence:
        """Assistant mode: train what the model generates for each post-prompt assistant message,
        each in the context it was generated in (one sequence where the template is prefix-stable)."""
        chat = self.chat
        hidden = self.control_text.hide(messages) if self.control_text else None
        messages = hidden or messages
        render = chat.renderer(tools, template_kwargs)
        whole = render(messages)
        spans = self.skeletons.spans(messages, n_prompt, whole, tools, template_kwargs) if self.skeletons else None
        if spans is not None:
            groups = [SequenceText(whole, spans)]
        else:  # the prefix renders decide
            groups = sequences(generation_turns(chat, render, messages, n_prompt, whole), whole)
        pieces = []
        for group in groups:
            if hidden:  # the sentinels back to the control text, encoded as text
                text, ranges = self.control_text.reveal(group.text)
                tokens = self.control_text.encode(self.encoder.encode(text), text, ranges)
            else:
                tokens = self.encoder.encode(group.text)
            bounds = TokenBounds.of(tokens.starts, tokens.ends)
            check_spans(group.text, bounds, messages, group.spans)
            pieces.append(Sequence(tokens.ids, labels_for(tokens.ids, trained_ranges(bounds.starts, group.spans))))
        return Sequence.join(pieces)


class KtoRecordBuilder(RecordBuilder):
    """`builder(n, row) -> (KtoRecord, truncated)`: one labelled trajectory, masked by the same
    rule as a pair's side (every assistant message after the prompt), truncated the same way."""

    kind = KTO

    def parse(self, row: object, tools_as_text: bool) -> Unpaired:
        unpaired = to_unpaired(row, self.options.string_arguments, tools_as_text)
        self.refuse_control_text_in("messages", unpaired.messages)
        return unpaired

    def mask_all(self, unpaired: Unpaired) -> list[Sequence]:
        return [self._mask(unpaired, unpaired.messages)]  # an Unpaired has what _mask reads of a Pair

    def __call__(self, n: int, row: object) -> tuple[KtoRecord, bool]:
        unpaired, (sequence,) = self.parse_and_mask(row)
        if not sequence.is_one_sequence:
            raise RowError(
                f"the trajectory is scored in {len(sequence.starts)} generation contexts (the chat template is not "
                "prefix-stable): a KTO row is one sequence, its KL sequence joining its prompt to another row's completion"
            )
        limit = self.options.max_length
        truncated = len(sequence) > limit
        sequence = truncate(sequence, limit)
        if sequence.trained_tokens == 0:
            raise Dropped(f"no trained token left after truncation to --max-length {limit}")
        problem = problem_key(unpaired.messages, unpaired.tools, unpaired.template_kwargs)
        return KtoRecord(sequence, unpaired.desirable, first_trained(sequence.labels), n, problem=problem), truncated


def builder_for(kind: str) -> type[RecordBuilder]:
    return KtoRecordBuilder if kind == KTO else RecordBuilder


def truncate(sequence: Sequence, max_length: int) -> Sequence:
    """Keep the start of each sequence, cut its tail (the prompt and first turns matter most)."""
    if all(len(piece) <= max_length for piece in sequence.pieces()):
        return sequence
    return Sequence.join([Sequence(p.input_ids[:max_length], p.labels[:max_length]) for p in sequence.pieces()])
