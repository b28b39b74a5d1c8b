"""The chat-template families mtdpo knows, in one registry.

A family is recognised by a string its templates contain. It says how a turn starts in the
rendered text (so show-sample and stats can name the turns of a cached sequence), how a tool
call and a tool result look, and which markers `--mask-mode seed` uses. Assistant-mode masking
needs none of this: it works from renders of any template.
"""

from __future__ import annotations

import re
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
    # --mask-mode seed: (user-turn start, end-of-turn) markers; Gemma's are the original research code's
    seed_markers: tuple[str, str] | None = None
    # Where a turn ends, when the template alone does not say (preprocess/template.py probes the
    # others): the tokens that may close an assistant turn, or none because the model stops by
    # emitting the next message's role token (GLM).
    end_markers: tuple[str, ...] = ()
    ends_with_next_role: bool = False

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


# Families whose turn ends the template alone does not say. Listed first: GLM's template also
# holds Phi-3's <|assistant|>.
IRREGULAR = (
    # gpt-oss: an assistant turn is several messages (analysis, then a call or a final answer),
    # each closed by its own token; the turn ends at the last one.
    Family(
        "gpt-oss",
        "<|channel|>",
        re.compile(r"<\|start\|>(?P<role>[a-z]+)"),
        ("<|start|>",),
        end_markers=("<|return|>", "<|call|>", "<|end|>"),
    ),
    # GLM-4.5/4.6: no end-of-turn token; the model stops by writing <|user|> or <|observation|>.
    Family(
        "glm",
        "[gMASK]<sop>",
        re.compile(r"<\|(?P<role>system|user|assistant|observation)\|>"),
        ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
        roles={"observation": "tool"},
        ends_with_next_role=True,
    ),
)


FAMILIES = (
    *IRREGULAR,
    Family(
        "gemma",
        "<start_of_turn>",
        re.compile(r"<start_of_turn>(?P<role>[^\n<]*)\n"),
        ("<start_of_turn>",),
        seed_markers=("<start_of_turn>user\n", "<end_of_turn>\n"),
    ),
    Family(
        "chatml",
        "<|im_start|>",
        re.compile(r"<\|im_start\|>(?P<role>[^\n<]*)\n"),
        ("<|im_start|>",),
        tool_call=re.compile(r"<tool_call>"),
        tool_result=re.compile(r"\A<\|im_start\|>user\n<tool_response>"),
        call_tokens=("<tool_call>",),
        seed_markers=("<|im_start|>user\n", "<|im_end|>\n"),
    ),
    Family(
        "llama3",
        "<|start_header_id|>",
        re.compile(r"<\|start_header_id\|>(?P<role>[^<]*)<\|end_header_id\|>"),
        ("<|start_header_id|>",),
        tool_call=re.compile(r"<\|end_header_id\|>\s*(\{\"name\"|<\|python_tag\|>)"),
        seed_markers=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        end_markers=("<|eot_id|>", "<|eom_id|>"),  # <|eom_id|>: a built-in tool call waits for its result
    ),
    Family(
        "phi3",
        "<|assistant|>",
        re.compile(r"<\|(?P<role>system|user|assistant)\|>"),
        ("<|system|>", "<|user|>", "<|assistant|>"),
        seed_markers=("<|user|>\n", "<|end|>\n"),
    ),
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
        seed_markers=("[INST]", "[/INST]"),
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
