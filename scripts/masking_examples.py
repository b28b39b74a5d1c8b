"""Print what each template family trains on one multi-turn pair: the blocks of docs/MASKING.md.

    .venv/bin/python scripts/masking_examples.py

Each family's tokenizer is the one the tests use (tests/helpers.py: the embedded byte-level BPE
with the family's special tokens and real chat template from tests/templates/). The text is
`mtdpo show-sample`'s plain view of the chosen side: trained text [[bracketed]], a `▸ role`
line before each turn. tests/test_docs.py checks that docs/MASKING.md quotes these blocks.
The templates with tool calls also show an agent pair: a call-only turn, the tool's result
and the answer, with the row's `tools` schema in the prompt.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import family_tokenizer, for_family, msg  # noqa: E402

from mtdpo.preprocess.records import MaskOptions, RecordBuilder  # noqa: E402
from mtdpo.show import build_view, plain_text  # noqa: E402
from mtdpo.synthetic import PYTHON_TOOL  # noqa: E402

# DeepSeek-V3 renders a call only for a null content, which apply_chat_template (and mtdpo) drops.
AGENT_FAMILIES = ["qwen2", "qwen3", "llama3", "mistral3"]
FAMILIES = ["gemma", "llama3", "qwen2", "mistral", "phi3"] + [f"{family} with a tool call" for family in AGENT_FAMILIES]
QUESTION = msg("user", "What is 17 * 23 + 5?")
PAIR = {
    "chosen": [
        QUESTION,
        msg("assistant", "Let me compute it.\n```python\nprint(17 * 23 + 5)\n```"),
        msg("tool", "```output\n396\n```"),
        msg("assistant", "The answer is \\boxed{396}."),
    ],
    "rejected": [QUESTION, msg("assistant", "By hand: 17 * 23 = 381, so \\boxed{386}.")],
}


def agent_pair(family: str) -> dict:
    """PAIR with a tool call instead of a code block."""
    arguments = {"code": "print(17 * 23 + 5)"}
    call = {"type": "function", "id": "call00001", "function": {"name": "python", "arguments": arguments}}
    calling = {"role": "assistant", "content": "", "tool_calls": [call]}
    result = {"role": "tool", "content": "396", "tool_call_id": "call00001"}
    chosen = [QUESTION, calling, result, PAIR["chosen"][-1]]
    return {"chosen": chosen, "rejected": PAIR["rejected"], "tools": [PYTHON_TOOL]}


def example(key: str) -> str:
    family, agent = key.removesuffix(" with a tool call"), key.endswith(" with a tool call")
    tok = family_tokenizer(family)
    record, _ = RecordBuilder(tok, MaskOptions())(0, agent_pair(family) if agent else for_family(PAIR, family))
    text = plain_text(build_view(record, tok, 0, ["chosen"]))
    return text.split("\n", 1)[1].rstrip("\n")  # without the "pair 0 (source row 0) …" title


# One row per irregular family (tests/templates): what each trained turn is scored after.
CONTEXT_FAMILIES = ["qwen3", "hermes3", "mistral-nemo", "gpt-oss", "glm4.6", "command-r7b", "phi3.5-real", "r1-distill"]


def context_row(family: str) -> dict:
    """A call (or a first answer, for a template without calls), its result, an answer, then a
    follow-up question and a second answer; the sides part at the first assistant turn."""
    plain = family in ("phi3.5-real", "r1-distill")  # no tool-call format: plain turns

    def side(code: str, answer: str, again: str) -> list[dict]:
        call = {"type": "function", "id": "call00001", "function": {"name": "python", "arguments": {"code": code}}}
        if plain:
            calling, result = msg("assistant", f"Let me think: {code}."), msg("user", "Go on.")
        else:
            calling = {"role": "assistant", "content": "", "tool_calls": [call]}
            if family in ("qwen3", "gpt-oss", "glm4.6"):  # the templates that render reasoning
                calling["reasoning_content"] = "Multiply."
            result = {
                "role": "tool",
                "content": answer.split()[-1].rstrip("."),
                "tool_call_id": "call00001",
                "name": "python",
            }
        system = [msg("system", "Be brief.")] if family in ("mistral-nemo", "hermes3") else []
        return [*system, msg("user", "What is 6 * 7?"), calling, result, msg("assistant", answer),
                msg("user", "And 6 * 8?"), msg("assistant", again)]  # fmt: skip

    row = {"chosen": side("print(6 * 7)", "It is 42.", "48."), "rejected": side("print(6 + 7)", "It is 13.", "14.")}
    return row | ({} if plain else {"tools": [PYTHON_TOOL]})


def context_example(family: str) -> str:
    """Each trained turn of the chosen side: the sequence it is in, the end of its context, and
    what is trained (decoded from the record mtdpo builds)."""
    tok = family_tokenizer(family)
    record, _ = RecordBuilder(tok, MaskOptions(max_length=1 << 16))(0, context_row(family))
    pieces = record.chosen.pieces()
    out = [f"chosen: {len(pieces)} sequence{'s' if len(pieces) > 1 else ''}"]
    for k, piece in enumerate(pieces, 1):
        starts = [
            t for t in range(len(piece.labels)) if piece.labels[t] != -100 and (t == 0 or piece.labels[t - 1] == -100)
        ]
        for start in starts:
            end = next((t for t in range(start, len(piece.labels)) if piece.labels[t] == -100), len(piece.labels))
            context = tok.decode(piece.input_ids[:start])
            out.append(f"sequence {k}: …{context[-60:]!r}")
            out.append(f"    trains {tok.decode(piece.input_ids[start:end])!r}")
    return "\n".join(out)


def main() -> None:
    for family in FAMILIES:
        print(f"### {family}\n\n````\n{example(family)}\n````\n")
    for family in CONTEXT_FAMILIES:
        print(f"#### {family}\n\n````\n{context_example(family)}\n````\n")


if __name__ == "__main__":
    main()
