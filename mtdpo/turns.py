"""Where the turns of a cached conversation start, read back from its tokens.

The shards hold token ids and labels, not roles. Roles are recovered from the decoded text:
the chat template family (recognised from the cache's copy of the template) tells which
turn-start markers to look for, e.g. Gemma's `<start_of_turn>ROLE\\n`. When the family is
unknown, callers fall back to runs of trained / masked tokens.

Agent turns are named from the text too: an assistant turn whose text holds the family's
tool-call syntax is "assistant (tool call)"; a turn that carries a tool result is "tool",
whatever header the template gives it (Qwen's `user` turn with `<tool_response>`, Llama's
`ipython`).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    signature: str  # a string every template of the family contains
    turn_start: re.Pattern  # one turn header in the decoded text; group "role"
    start_tokens: tuple[str, ...] = ()  # special tokens that each open one turn (to count turns by id)
    roles: dict[str, str] = field(default_factory=dict)  # markers that are not role names (Mistral)
    tool_call: re.Pattern | None = None  # found in the text of an assistant turn that calls a tool
    tool_result: re.Pattern | None = None  # found at the start of a turn's content that is a tool result
    call_tokens: tuple[str, ...] = ()  # one token per tool call, to count calls by id

    def role(self, match: re.Match) -> str:
        name = match.group("role")
        return self.roles.get(name, name)

    def turn_role(self, role: str, text: str) -> str:
        """The role to show for one turn, given its header's role and its decoded text."""
        if role in TOOL_ROLES or (self.tool_result and self.tool_result.search(text)):
            return "tool"
        if role in ASSISTANT_ROLES and self.tool_call and self.tool_call.search(text):
            return f"{role} (tool call)"
        return role


TOOL_ROLES = ("tool", "ipython", "observation", "function")
ASSISTANT_ROLES = ("assistant", "model")


FAMILIES = (
    Family("gemma", "<start_of_turn>", re.compile(r"<start_of_turn>(?P<role>[^\n<]*)\n"), ("<start_of_turn>",)),
    Family(
        "chatml",
        "<|im_start|>",
        re.compile(r"<\|im_start\|>(?P<role>[^\n<]*)\n"),
        ("<|im_start|>",),
        tool_call=re.compile(r"<tool_call>"),
        tool_result=re.compile(r"\A<\|im_start\|>user\n<tool_response>"),
        call_tokens=("<tool_call>",),
    ),
    Family(
        "llama3",
        "<|start_header_id|>",
        re.compile(r"<\|start_header_id\|>(?P<role>[^<]*)<\|end_header_id\|>"),
        ("<|start_header_id|>",),
        tool_call=re.compile(r"<\|end_header_id\|>\s*(\{\"name\"|<\|python_tag\|>)"),
    ),
    Family("phi3", "<|assistant|>", re.compile(r"<\|(?P<role>system|user|assistant)\|>"), ("<|system|>", "<|user|>", "<|assistant|>")),
    # [INST] and [/INST] are plain text in most Mistral vocabularies (and merge with a space):
    # turns are found in the text, but cannot be counted by token id. v0.3 adds tool results,
    # after which the assistant writes without an [/INST].
    Family(
        "mistral",
        "[INST]",
        re.compile(r"\[(?P<role>/?INST|/?TOOL_RESULTS)\]"),
        roles={"INST": "user", "/INST": "assistant", "TOOL_RESULTS": "tool", "/TOOL_RESULTS": "assistant"},
        tool_call=re.compile(r"\[TOOL_CALLS\]"),
        call_tokens=("[TOOL_CALLS]",),
    ),
    # DeepSeek-V3: no header after tool outputs, the answer follows <｜tool▁outputs▁end｜>.
    Family(
        "deepseek",
        "<｜Assistant｜>",
        re.compile(r"<｜(?P<role>User|Assistant|tool▁outputs▁begin|tool▁outputs▁end)｜>"),
        roles={"User": "user", "Assistant": "assistant", "tool▁outputs▁begin": "tool", "tool▁outputs▁end": "assistant"},
        tool_call=re.compile(r"<｜tool▁call▁begin｜>"),
        call_tokens=("<｜tool▁call▁begin｜>",),
    ),
)


def detect_family(chat_template: str | None) -> Family | None:
    """The first family whose signature the template contains, or None."""
    for family in FAMILIES:
        if chat_template and family.signature in chat_template:
            return family
    return None


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
