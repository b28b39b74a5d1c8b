"""mtdpo/preprocess/tokens.py: a text that shares a prefix with the previous one is encoded
with exactly the tokens the tokenizer gives the whole text, without encoding the prefix again;
offsets rebuilt from what each token covered before equal the tokenizer's, or are not used;
and spans.TokenBounds, the token boundaries the mask and its self-check bisect."""

from __future__ import annotations

import copy
import random
import re

import pytest
from helpers import FAMILIES, RowEncoder, family_tokenizer, for_family, math_agent_pairs, sample_rows

from mtdpo.preprocess.records import MaskOptions, RecordBuilder
from mtdpo.preprocess.rows import RowError
from mtdpo.preprocess.spans import TokenBounds, TurnSpan, labels_for, trained_ranges
from mtdpo.preprocess.template import added_tokens
from mtdpo.preprocess.tokens import PrefixReusingEncoder, Tokens, TokenSurfaces, common_prefix_length, reuse_rule


def whole(tok, text: str) -> Tokens:
    """The tokenizer's own encoding of the whole text (Tokens.of is checked by hand below)."""
    return Tokens.of(tok.backend_tokenizer.encode(text, add_special_tokens=False))


def splits_a_character(tokens: Tokens) -> bool:
    """Whether two tokens share a character (each holds some of its bytes): their offsets overlap."""
    return any(start < end for start, end in zip(tokens.starts[1:], tokens.ends))


def test_tokens_split_and_move_offsets_by_hand():
    class Encoding:  # what Tokens.of reads of a tokenizers Encoding
        ids, offsets = [7, 8, 9], [(0, 2), (3, 4), (4, 6)]

    assert Tokens.of(Encoding()) == ([7, 8, 9], [0, 3, 4], [2, 4, 6])
    assert Tokens.of(Encoding(), shift=10) == ([7, 8, 9], [10, 13, 14], [12, 14, 16])


def test_common_prefix_length_by_hand():
    assert common_prefix_length("abcde", "abcxy") == 3
    assert common_prefix_length("abc", "abc") == 3
    assert common_prefix_length("", "abc") == 0
    assert common_prefix_length("xbc", "abc") == 0
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 3]) == 3


def test_reuse_cuts_after_an_added_token_well_before_the_texts_part():
    tok = family_tokenizer("gemma")
    rule = reuse_rule(tok)
    assert rule is not None and rule.margin == max(len(t.content) for t in tok.added_tokens_decoder.values())
    prompt = "<bos><start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n"
    first, second = prompt + "It is 4.<end_of_turn>\n", prompt + "It is five, I think.<end_of_turn>\n"
    encoder = PrefixReusingEncoder(tok, rule)
    assert encoder.encode(first) == whole(tok, first)
    assert encoder.encode(second) == whole(tok, second)
    # The texts part at "It is " + "4"/"five": the last added token ending `margin` characters
    # before that is <end_of_turn> after the question (<start_of_turn> of "model" is too close).
    cut = prompt.index("<end_of_turn>") + len("<end_of_turn>")
    assert encoder.reused_tokens == len(whole(tok, first[:cut])[0])


def test_no_reuse_when_the_texts_part_too_early_or_the_rule_is_off():
    tok = family_tokenizer("gemma")
    encoder = PrefixReusingEncoder(tok, reuse_rule(tok))
    encoder.encode("<bos>abc<end_of_turn>x")
    assert encoder.encode("<bos>abd<end_of_turn>x") == whole(tok, "<bos>abd<end_of_turn>x")
    assert encoder.reused_tokens == 0  # they part 3 characters in: no cut far enough before
    off = PrefixReusingEncoder(tok, None)
    text = "<bos>" + "same " * 20
    off.encode(text)
    assert off.encode(text + "more") == whole(tok, text + "more") and off.reused_tokens == 0


def test_a_short_shared_prefix_is_not_reused():
    """Reuse pays only when the prefix is long beside the rest (REUSE_MIN_SHARE): rows that
    share just "<bos><start_of_turn>" are encoded whole, with the same tokens either way."""
    from mtdpo.preprocess.tokens import REUSE_MIN_SHARE

    tok = family_tokenizer("gemma")
    encoder = PrefixReusingEncoder(tok, reuse_rule(tok))
    head = (
        "<bos><start_of_turn>user\nPlease tell me, what is "  # the texts part after it, so the cut is <start_of_turn>
    )
    cut = len("<bos><start_of_turn>")
    long_rest = "x" * (REUSE_MIN_SHARE * cut + 40)  # the rest is more than REUSE_MIN_SHARE times the cut
    encoder.encode(head + "2 + 2?" + long_rest)
    second = head + "3 + 3?" + long_rest
    assert encoder.encode(second) == whole(tok, second) and encoder.reused_tokens == 0
    short_rest = "y" * (REUSE_MIN_SHARE * cut - 40)  # and here less: the two tokens are reused
    encoder.encode(head + "2 + 2?" + short_rest)
    third, before = head + "3 + 3?" + short_rest, encoder.reused_tokens
    assert encoder.encode(third) == whole(tok, third)
    assert encoder.reused_tokens - before == len(whole(tok, head[:cut])[0]) == 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_pair_encodes_as_if_whole_on_every_family(family):
    """Both sides of many pairs (multi-turn, tool turns, awkward whitespace) and pairs in a row:
    the reused encodings equal the whole ones token for token, offsets included."""
    tok = family_tokenizer(family)
    builder = RecordBuilder(tok, MaskOptions())
    chat, encoder = builder.chat, builder.encoder
    assert encoder.rule is not None  # every family's tokenizer qualifies
    rows = [for_family(r, family) for r in [*sample_rows(60), *math_agent_pairs().values()]]
    rng = random.Random(0)
    texts = []
    for row in rows:
        for side in ("chosen", "rejected"):
            try:
                texts.append(chat.render(row[side]))
            except RowError:
                pass
    # Sides that part right after a header, inside whitespace, or at an added token.
    for text in texts[:40]:
        at = rng.randrange(len(text))
        texts += [text, text[:at] + "\n\n" + text[at:], text[:at] + tok.eos_token + text[at:], text[:at] + "  x"]
    for text in texts:
        assert encoder.encode(text) == whole(tok, text)
    assert encoder.reused_tokens > 0
    before = encoder.rebuilt_offsets
    for text in texts:  # again: every token is known now, so the offsets are rebuilt
        assert encoder.encode(text) == whole(tok, text)
    # ... for every text whose tokens hold whole characters (an added token cut open above,
    # DeepSeek's "<｜User｜>" with "\n\n" inside, leaves "｜" to byte-level pieces).
    whole_characters = [t for t in texts if not splits_a_character(whole(tok, t))]
    assert len(whole_characters) > len(texts) * 0.9
    assert encoder.surfaces is not None and encoder.rebuilt_offsets - before >= len(whole_characters)


def test_the_rule_refuses_tokenizers_it_cannot_show_exact():
    tok = copy.deepcopy(family_tokenizer("gemma"))
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    assert reuse_rule(tok) is None  # "▁" before the first piece only
    tok = copy.deepcopy(family_tokenizer("gemma"))
    from transformers import AddedToken

    tok.add_tokens([AddedToken("<sep>", rstrip=True)])
    assert reuse_rule(tok) is None  # a token that eats the whitespace after it
    tok = copy.deepcopy(family_tokenizer("gemma"))
    tok.backend_tokenizer.enable_truncation(8)
    assert reuse_rule(tok) is None


def test_pairs_are_the_same_with_and_without_reuse():
    tok = family_tokenizer("qwen2")
    rows = [for_family(r, "qwen2") for r in [*sample_rows(40), *math_agent_pairs().values()]]
    fast, slow = RowEncoder(tok, MaskOptions()), RowEncoder(tok, MaskOptions())
    slow.builder.encoder.rule = None
    for row in rows:
        try:
            expected = slow(row)
        except RowError as err:
            with pytest.raises(RowError, match=f"^{re.escape(str(err))}$"):
                fast(row)
            continue
        assert fast(row) == expected
    assert fast.builder.encoder.reused_tokens > 0 and slow.builder.encoder.reused_tokens == 0


# ── TokenSurfaces: offsets rebuilt from what each token covered before ──────


def test_surfaces_rebuild_offsets_by_hand():
    surfaces = TokenSurfaces(8)
    assert surfaces.learn("abcd", Tokens([1, 2, 3], [0, 2, 3], [2, 3, 4]))  # "ab" "c" "d"
    assert surfaces.text[1:4] == ["ab", "c", "d"]
    assert surfaces.offsets("abcd", [1, 2, 3]) == ([1, 2, 3], [0, 2, 3], [2, 3, 4])
    assert surfaces.offsets("cdab", [2, 3, 1], shift=5) == ([2, 3, 1], [5, 6, 7], [6, 7, 9])
    assert surfaces.offsets("abce", [1, 2, 3]) is False  # the known texts spell "abcd"
    assert surfaces.offsets("abx", [1, 4]) is None  # token 4 never seen
    assert surfaces.offsets("ab", [1, 9]) is None  # an id past the table
    assert surfaces.learn("xcd", Tokens([4, 2, 3], [10, 11, 12], [11, 12, 13]), shift=10)  # offsets moved by 10
    assert surfaces.text[4] == "x"


def test_surfaces_refuse_tokens_that_cover_different_text():
    surfaces = TokenSurfaces(8)
    assert surfaces.learn("ab", Tokens([1, 2], [0, 1], [1, 2]))
    assert not surfaces.learn(
        "Ab", Tokens([1, 2], [0, 1], [1, 2])
    )  # token 1 covered "a", now "A" (a folding normalizer)
    assert not surfaces.learn("a b", Tokens([1, 2], [0, 2], [1, 3]))  # a gap: the space is in no token
    assert not surfaces.learn("ab", Tokens([5, 6], [0, 0], [1, 2]))  # two ASCII tokens overlap
    assert not surfaces.learn("abc", Tokens([1, 2], [0, 1], [1, 2]))  # the tokens stop short of the end
    assert surfaces.text[5:7] == [None, None]  # nothing learned from a refused encoding


def test_a_character_split_between_tokens_is_never_learned():
    """Byte-level BPE may put the two bytes of "²" in two tokens, each with the offsets of the
    whole character: the text keeps the tokenizer's offsets, and is not tried again."""
    surfaces = TokenSurfaces(8)
    assert surfaces.worth_trying("k²")
    assert surfaces.learn("k²", Tokens([1, 2, 3], [0, 1, 1], [1, 2, 2]))  # not a contradiction: nothing learned
    assert surfaces.text[1:4] == [None, None, None] and surfaces.split == {"²"}
    assert not surfaces.worth_trying("x²") and surfaces.worth_trying("x³") and surfaces.worth_trying("plain ascii")


def surfaces_for(tok) -> TokenSurfaces:
    """A table for `tok`, as RecordBuilder builds its encoder's."""
    return TokenSurfaces(tok.backend_tokenizer.get_vocab_size(with_added_tokens=True), added_tokens(tok))


def test_rebuilt_offsets_stop_on_a_tokenizer_whose_tokens_cover_different_text():
    """A lowercasing normalizer: "hello" and "Hello" are one token covering different text. The
    first text that has both shows it, and every encoding, before and after, equals the tokenizer's own."""
    from tokenizers import normalizers, processors

    tok = copy.deepcopy(family_tokenizer("gemma"))
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    encoder = PrefixReusingEncoder(tok, None, surfaces_for(tok))
    for text in ["hello there", "hello there", "Hello there", "hello there", "<bos>HELLO"]:
        assert encoder.encode(text) == whole(tok, text)
    assert encoder.surfaces is None and encoder.rebuilt_offsets == 1  # the second text; the third showed the folding

    tok = copy.deepcopy(family_tokenizer("qwen2"))
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    encoder = PrefixReusingEncoder(tok, None, surfaces_for(tok))
    for text in ["a b", "a b", " a  b "]:  # trimmed: " b" covers "b", so the tokens leave gaps
        assert encoder.encode(text) == whole(tok, text)
    assert encoder.surfaces is None and encoder.rebuilt_offsets == 0


def test_non_ascii_texts_are_exact_with_and_without_rebuilt_offsets():
    tok = family_tokenizer("qwen2")
    encoder = PrefixReusingEncoder(tok, reuse_rule(tok), surfaces_for(tok))
    rng = random.Random(1)
    alphabet = ["a", " ", "\n", "²", "é", "数", "🙂", "x²", "<|im_end|>", "  ", "1"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(400)]
    for text in texts + texts:
        assert encoder.encode(text) == whole(tok, text)
    assert encoder.surfaces is not None and encoder.surfaces.split and encoder.rebuilt_offsets > 0


# ── TokenBounds, trained_ranges, labels_for ──────────────────────────────────


def test_token_bounds_by_hand():
    # "ab cd" as tokens "ab", " c" trimmed to "c" (2..4 would be " c"), "d"; and a token that
    # reaches further than the one after it (ends out of order).
    bounds = TokenBounds.of([0, 3, 4], [2, 4, 5])
    assert bounds.starts == [0, 3, 4] and bounds.reach == [2, 4, 5]
    assert bounds.overhang(0) == bounds.overhang(2) == bounds.overhang(3) == 0
    assert bounds.overhang(1) == 1  # inside "ab": the token reaches one character past it
    odd = TokenBounds.of([0, 2, 6], [6, 3, 7])
    assert odd.reach == [6, 6, 7] and odd.overhang(4) == 2  # the first token covers 0..6
    with pytest.raises(RowError, match="out of order"):
        TokenBounds.of([3, 0], [4, 2])
    assert TokenBounds.of([], []).starts == []


def test_trained_ranges_and_labels_by_hand():
    starts = [0, 5, 9, 12, 20, 24]
    spans = [TurnSpan(1, 9, 20), TurnSpan(3, 24, 30)]
    assert trained_ranges(starts, spans) == [(2, 4), (5, 6)]  # tokens starting at 9, 12; and 24
    assert labels_for([10, 11, 12, 13, 14, 15], [(2, 4), (5, 6)]) == [-100, -100, 12, 13, -100, 15]
