"""Where the turns of a cached conversation start, read back from its tokens.

The shards hold token ids and labels, not roles. Roles are recovered from the decoded text:
the chat template family (mtdpo/families.py, recognised from the cache's copy of the template)
tells which turn-start markers to look for, e.g. Gemma's `<start_of_turn>ROLE\\n`. When the family is
unknown, callers fall back to runs of trained / masked tokens.

Agent turns are named from the text too: an assistant turn whose text holds the family's
tool-call syntax is "assistant (tool call)"; a turn that carries a tool result is "tool",
whatever header the template gives it (Qwen's `user` turn with `<tool_response>`, Llama's
`ipython`).
"""

from __future__ import annotations

from bisect import bisect_right

from mtdpo.families import Family


def token_starts(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The decoded text of `ids` and the character where each token starts in it.

    Tokens partition the text: token k is text[starts[k]:starts[k+1]]. The offsets come from
    re-tokenizing the decoded text, which gives back the same ids for a whole rendered
    conversation; when it does not (a sequence cut mid-word, a decoder that drops spaces),
    each token's own decoding is laid end to end instead.
    """
    ids = list(ids)
    text = tokenizer.decode(ids)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoded["input_ids"] == ids:
        starts = [start for start, _ in encoded["offset_mapping"]]
    else:
        pieces = [tokenizer.decode([i]) for i in ids]
        text, starts, position = "".join(pieces), [], 0
        for piece in pieces:
            starts.append(position)
            position += len(piece)
    # A character split over several byte-level tokens gives each of them the character's offsets:
    # the last one shows it, the others are empty. Starts stay non-decreasing, the first at 0, so
    # the pieces always join to the whole text.
    for k in range(len(starts)):
        starts[k] = 0 if k == 0 else max(starts[k], starts[k - 1])
    return text, starts


def turn_starts(text: str, starts: list[int], family: Family) -> list[tuple[int, str]]:
    """(first token, role) of each turn, in order; [] when no marker is found.

    A marker's turn starts at the token holding its first character (Mistral's " [INST]" is
    one token). Tokens before the first marker (BOS) belong to the first turn.
    """
    ends = starts[1:] + [len(text)]
    turns: list[tuple[int, str]] = []
    for match in family.turn_start.finditer(text):
        token = bisect_right(ends, match.start())
        if token >= len(starts):
            break
        if turns and token <= turns[-1][0]:
            continue  # two markers in one token: the first one opened the turn
        turns.append((0 if not turns else token, family.role(match)))
    return turns
