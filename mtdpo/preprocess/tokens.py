"""Encode texts that share a prefix without encoding the prefix again, with the same tokens.

The two sides of a pair render the same shared prompt, so the second side's text begins with
hundreds of characters the first side's encoding already covers. A tokenizer (Hugging Face
`tokenizers`) first cuts a text at its added tokens (`<start_of_turn>`, `<|im_start|>` …) and
then normalizes, pre-tokenizes and encodes each piece on its own. So where the previous text's
encoding holds such a token ending at character q, and the new text equals the previous one
well past q, the new text's tokens are the previous tokens up to q followed by the tokens of
`text[q:]` encoded alone (offsets moved by q).

That holds only for tokenizers whose every stage is piece-local, and only for cut tokens
that are matched on the raw text and absorb nothing around them; `reuse_rule` checks the
tokenizer's configuration against the stages known to be piece-local and returns None for
any other (then every text is encoded whole). "Well past q": the two texts agree for the
length of the longest added token after q, so no added-token match near q can differ.

Offsets are the other cost: `tokenizers` converts every token's byte offsets to character
offsets through a map of the whole text, which makes an encoding with offsets dearer than one
without (`encode_batch_fast`; docs/PERFORMANCE.md has the figures). So a text is encoded without them, and its offsets are rebuilt
from what each token id covered in earlier encodings (TokenSurfaces): the tokens' texts, one
after another, must spell the text exactly, or the offsets come from the tokenizer. That gives
the tokenizer's offsets where a token covers the same characters wherever it appears; every
encoding made with offsets is checked for that, and the first that shows otherwise (offsets
trimmed of spaces, a lowercasing normalizer) turns the rebuilding off for the run.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

# Stages of `tokenizers` that see only one piece at a time (nothing of the text before it).
PIECE_LOCAL = {
    "normalizer": {
        "Replace",
        "NFC",
        "NFD",
        "NFKC",
        "NFKD",
        "Lowercase",
        "Prepend",
        "Strip",
        "StripAccents",
        "BertNormalizer",
        "Nmt",
        "Precompiled",
    },
    "pre_tokenizer": {
        "ByteLevel",
        "Split",
        "Whitespace",
        "WhitespaceSplit",
        "Punctuation",
        "Digits",
        "CharDelimiterSplit",
        "BertPreTokenizer",
        "UnicodeScripts",
        "Metaspace",
    },
    "model": {"BPE", "WordPiece", "WordLevel", "Unigram"},
}


# Reuse a prefix only if it is at least 1/REUSE_MIN_SHARE of the text left to encode. Moving the
# rest's offsets costs time in proportion to the rest: consecutive rows that share only
# "<bos><start_of_turn>" cost more with reuse than without (bench data, embedded tokenizer).
REUSE_MIN_SHARE = 8


class Tokens(NamedTuple):
    """A text's token ids, and where each token starts and ends in it (character offsets): what
    the mask bisects. Two lists, not (start, end) pairs: the rest after a reused prefix has its
    offsets moved as they are split into the two, where moving the pairs first was a pass of its
    own."""

    ids: list[int]
    starts: list[int]
    ends: list[int]

    @classmethod
    def of(cls, encoding, shift: int = 0) -> Tokens:
        """From a `tokenizers` Encoding, its offsets moved by `shift` characters."""
        offsets = encoding.offsets  # a new list of tuples at each access: read once
        if shift:
            return cls(encoding.ids, [start + shift for start, _ in offsets], [end + shift for _, end in offsets])
        return cls(encoding.ids, [start for start, _ in offsets], [end for _, end in offsets])


@dataclass(frozen=True)
class ReuseRule:
    cut_ids: frozenset[int]  # added tokens a text may be cut after
    margin: int  # characters both texts must share after the cut: the longest added token


def reuse_rule(tokenizer) -> ReuseRule | None:
    """The rule for this (transformers) tokenizer, or None where reuse cannot be shown exact."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation or backend.padding:
        return None
    stages = {
        "normalizer": flatten(state(backend.normalizer)),
        "pre_tokenizer": flatten(state(backend.pre_tokenizer)),
        "model": [{"type": type(backend.model).__name__}],
    }
    for stage, allowed in PIECE_LOCAL.items():
        if not all(component_type(c) in allowed for c in stages[stage]):
            return None
    if any(c.get("prepend_scheme") == "first" for c in stages["pre_tokenizer"]):
        return None  # Metaspace adds "▁" to the first piece only: a cut text's first piece differs
    if getattr(backend.model, "dropout", None):
        return None  # random merges: no two encodings are the same anyway
    added = tokenizer.added_tokens_decoder  # built anew at every access (Gemma 3 has 6k): read once
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return None  # a token that swallows the whitespace around it reaches across a cut
    cut_ids = frozenset(i for i, t in added.items() if not t.normalized)
    if not cut_ids:
        return None
    rule = ReuseRule(cut_ids, max(len(t.content) for t in added.values()))
    probes = sorted(added[i].content for i in cut_ids)[:4]
    return rule if agrees_on_probes(tokenizer, rule, probes) else None


def state(component) -> dict | None:
    """A `tokenizers` stage as its JSON configuration (cheap: not the vocabulary)."""
    return None if component is None else json.loads(component.__getstate__())


def agrees_on_probes(tokenizer, rule: ReuseRule, cuts: list[str]) -> bool:
    """A last guard: reused and whole encodings agree on texts cut after each of `cuts` (added
    tokens), with spaces, newlines and a repeated token around the cut."""
    backend = tokenizer.backend_tokenizer
    pad = "x" * rule.margin
    for cut in cuts:
        for after in (" a", "\n\nb", "  c d", cut + "e", "\u00e9f ", "1 2"):
            first, second = f"hi {cut}{after}{pad} one", f"hi {cut}{after}{pad}two {cut}"
            encoder = PrefixReusingEncoder(tokenizer, rule)
            encoder.encode(first)
            if encoder.encode(second) != Tokens.of(backend.encode(second, add_special_tokens=False)):
                return False
    return True


def component_type(component: dict) -> str:
    return component.get("type", "")


def flatten(component: dict | None) -> list[dict]:
    """A stage's components, Sequence stages opened up (none at all: [])."""
    if component is None:
        return []
    inner = component.get("normalizers") or component.get("pretokenizers")
    return [leaf for c in inner for leaf in flatten(c)] if component_type(component) == "Sequence" else [component]


class TokenSurfaces:
    """What each token id covers in the text, learned from the tokenizer's own offsets, to give an
    encoding made without offsets its offsets back: exactly where the tokens' texts, one after
    another, spell the text. Where every token covers whole characters, the tokens cover the text
    end to end and each covers what it covered before, so those are the tokenizer's offsets. A
    token holding part of a character (byte-level BPE on "²") overlaps the next one and is never
    learned: a text with one keeps the tokenizer's offsets. A tokenizer where a token covers
    different text in different places (offsets trimmed of spaces, a normalizer that adds or folds
    characters) shows it in the first encoding that does: `learn` or `offsets` returns False, and
    the caller stops using this for the rest of the run."""

    def __init__(self, size: int, added: Iterable[str] = ()):
        """`size`: the vocabulary's, added tokens included; `added`: the added tokens' strings."""
        self.text: list[str | None] = [None] * size  # by id; a list, as the ids index it at C speed
        self.split: set[str] = set()  # characters seen split between two tokens
        # Characters of added tokens (DeepSeek's "｜", "▁"): whole inside those tokens, so a text
        # that holds them is tried even after one was seen split elsewhere.
        self.in_added = {c for token in added for c in token if not c.isascii()}

    def worth_trying(self, text: str) -> bool:
        """Whether the offsets of `text` may be rebuilt: not if it holds a character that an
        earlier encoding split between tokens (the tokenizer's offsets are needed then)."""
        return text.isascii() or not self.split.intersection(text)

    def learn(self, text: str, tokens: Tokens, shift: int = 0) -> bool:
        """Record what each token covers (its offsets moved by `shift` in `text`), if the tokens
        cover it end to end; otherwise, where two share a character, that the character is split.
        False if a token covers other text than before, or the tokens leave a gap."""
        known, position, seen = self.text, shift, []
        for i, start, end in zip(*tokens):
            covered = text[start - shift : end - shift]
            if known[i] is not None and known[i] != covered:
                return False
            if start != position:
                if start > position or text.isascii():
                    return False  # a gap, or an ASCII character in two tokens: not whole characters
                if (c := text[start - shift]) not in self.in_added:
                    self.split.add(c)  # part of this character in each of two tokens
                return True
            seen.append((i, covered))
            position = end
        if position != shift + len(text):
            return False
        for i, covered in seen:
            known[i] = covered
        return True

    def offsets(self, text: str, ids: list[int], shift: int = 0) -> Tokens | bool | None:
        """The Tokens of `ids` with offsets rebuilt (moved by `shift`); None if a token is not
        known yet, False if the known texts do not spell `text`."""
        try:
            covered = [self.text[i] for i in ids]
            if "".join(covered) != text:
                return False
        except (TypeError, IndexError):  # a token never seen (None in the join) or an id past the table
            return None
        edges = list(accumulate(map(len, covered), initial=shift))
        return Tokens(ids, edges[:-1], edges[1:])


class PrefixReusingEncoder:
    """`encode(text) -> Tokens`, the tokens of `backend.encode(text, add_special_tokens=False)`,
    reusing the tokens of the previous text's shared prefix where `rule` allows it, and the
    offsets of earlier encodings where `surfaces` can rebuild them (None: always from the tokenizer)."""

    def __init__(self, tokenizer, rule: ReuseRule | None, surfaces: TokenSurfaces | None = None):
        self.backend, self.rule, self.surfaces = tokenizer.backend_tokenizer, rule, surfaces
        # transformers sets this per call and leaves it set after `split_special_tokens=True`;
        # this encoder calls the backend directly, where control tokens must be tokens.
        self.backend.encode_special_tokens = False
        self.previous: tuple[str, Tokens] | None = None
        self.reused_tokens = 0  # for tests and benchmarks: tokens not encoded again
        self.rebuilt_offsets = 0  # for tests and benchmarks: texts encoded without offsets

    def encode(self, text: str) -> Tokens:
        k = self.reusable(text)
        if k:
            old = self.previous[1]
            cut = old.ends[k - 1]
            rest = self.encode_alone(text[cut:], shift=cut)
            tokens = Tokens(old.ids[:k] + rest.ids, old.starts[:k] + rest.starts, old.ends[:k] + rest.ends)
            self.reused_tokens += k
        else:
            tokens = self.encode_alone(text)
        self.previous = (text, tokens)
        return tokens

    def encode_alone(self, text: str, shift: int = 0) -> Tokens:
        """The tokenizer's encoding of `text`, offsets moved by `shift`: made without offsets and
        rebuilt where the surfaces can, otherwise with them (and the surfaces learn from it)."""
        fast_ids = None
        if self.surfaces is not None and self.surfaces.worth_trying(text):
            fast_ids = self.backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
            rebuilt = self.surfaces.offsets(text, fast_ids, shift)
            if isinstance(rebuilt, Tokens):
                self.rebuilt_offsets += 1
                return rebuilt
            if rebuilt is False:  # every token known, and their texts do not spell this one
                self.surfaces = fast_ids = None
        tokens = Tokens.of(self.backend.encode(text, add_special_tokens=False), shift)
        if fast_ids is not None and (fast_ids != tokens.ids or not self.surfaces.learn(text, tokens, shift)):
            self.surfaces = (
                None  # a token that covers different text in different places: offsets from the tokenizer from now on
            )
        return tokens

    def reusable(self, text: str) -> int:
        """How many of the previous text's tokens `text` begins with (0: encode it whole): those
        up to the last cut token that ends at least `margin` characters before the texts part,
        if that prefix is long enough to pay for moving the offsets of the rest."""
        if self.rule is None or self.previous is None:
            return 0
        old_text, old = self.previous
        limit = common_prefix_length(text, old_text) - self.rule.margin  # a cut must end by here
        k = bisect_right(old.starts, limit)  # the tokens that start by `limit`: any that ends by it is among them
        while k and not (old.ids[k - 1] in self.rule.cut_ids and old.ends[k - 1] <= limit):
            k -= 1
        if k and (cut := old.ends[k - 1]) * REUSE_MIN_SHARE < len(text) - cut:
            return 0
        return k


def common_prefix_length(a: str | list, b: str | list) -> int:
    """Characters (or tokens) a and b share before they differ: a bisection on slices, which
    Python compares in C (a loop over them was a tenth of the per-row time with Gemma 3)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # invariant: a[:lo] == b[:lo], and they differ within a[:hi + 1]
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
