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

AGENT_FAMILIES = ["qwen2", "qwen3", "llama3", "mistral3", "deepseek3"]
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
    """PAIR with a tool call instead of a code block; DeepSeek-V3 takes null content and a JSON string."""
    arguments = {"code": "print(17 * 23 + 5)"}
    call = {"type": "function", "id": "call00001", "function": {"name": "python", "arguments": arguments}}
    if family == "deepseek3":
        call["function"]["arguments"] = '{"code": "print(17 * 23 + 5)"}'
    calling = {"role": "assistant", "content": None if family == "deepseek3" else "", "tool_calls": [call]}
    result = {"role": "tool", "content": "396", "tool_call_id": "call00001"}
    chosen = [QUESTION, calling, result, PAIR["chosen"][-1]]
    return {"chosen": chosen, "rejected": PAIR["rejected"], "tools": [PYTHON_TOOL]}


def example(key: str) -> str:
    family, agent = key.removesuffix(" with a tool call"), key.endswith(" with a tool call")
    tok = family_tokenizer(family)
    record, _ = RecordBuilder(tok, MaskOptions())(0, agent_pair(family) if agent else for_family(PAIR, family))
    text = plain_text(build_view(record, tok, 0, ["chosen"]))
    return text.split("\n", 1)[1].rstrip("\n")  # without the "pair 0 (source row 0) …" title


def main() -> None:
    for family in FAMILIES:
        print(f"### {family}\n\n````\n{example(family)}\n````\n")


if __name__ == "__main__":
    main()
