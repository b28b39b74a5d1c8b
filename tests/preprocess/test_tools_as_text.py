"""`--tools-as-text`: OpenAI-style tool rows on chat templates without tool support (Gemma's).

Without it every such row is rejected, and the reason names the missing tool support and the
option; with it the calls, results and schemas are written as text before templating, and the
assistant turns train exactly their text, call blocks and end marker included."""

from __future__ import annotations

import json

import pytest
from agent_rows import TOOLS, agent_rows
from helpers import RowEncoder, assert_user_error, family_tokenizer, invoke, write_jsonl

from mtdpo.cache import read_manifest
from mtdpo.preprocess.records import MaskOptions
from mtdpo.preprocess.rows import to_unpaired
from mtdpo.preprocess.text_tools import TOOLS_HEADER, tools_as_text

PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
    },
}
SCHEMA_LINE = json.dumps(PYTHON_TOOL["function"])
# The README's tool-use row (data format section).
README_ROW = {
    "tools": [PYTHON_TOOL],
    "prompt": [{"role": "user", "content": "What is 17 * 23 + 5?"}],
    "chosen": [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "python", "arguments": {"code": "print(17 * 23 + 5)"}}}
            ],
        },
        {"role": "tool", "content": "396"},
        {"role": "assistant", "content": "The answer is \\boxed{396}."},
    ],
    "rejected": [{"role": "assistant", "content": "By hand: \\boxed{386}."}],
}
# Rows of tests/agent_rows.py whose every turn Gemma can show once written as text (the
# `reasoning` shape's reasoning_content is not, and two shapes hold no tool at all).
TOOL_SHAPES = [0, 1, 3, 4, 5, 7]


def test_calls_results_and_schemas_become_text():
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call, call]},
        {"role": "tool", "content": "18°C", "tool_call_id": "a"},
        {"role": "tool", "content": "```output\n19°C\n```"},  # already fenced: kept as it is
        {"role": "assistant", "tool_calls": README_ROW["chosen"][0]["tool_calls"]},
        {"role": "ipython", "content": "396"},
        {"role": "assistant", "content": "18°C."},
    ]
    block = '```tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
    assert tools_as_text(messages, [PYTHON_TOOL]) == [
        {"role": "system", "content": f"Be brief.\n\n{TOOLS_HEADER}\n{SCHEMA_LINE}"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": f"Checking.\n{block}\n{block}"},
        {"role": "user", "content": "```output\n18°C\n```\n```output\n19°C\n```"},
        {"role": "assistant", "content": "```python\nprint(17 * 23 + 5)\n```"},
        {"role": "user", "content": "```output\n396\n```"},
        {"role": "assistant", "content": "18°C."},
    ]
    # no system message: the schemas go in front of the first user message
    assert tools_as_text(messages[1:2], [PYTHON_TOOL])[0]["content"] == f"{TOOLS_HEADER}\n{SCHEMA_LINE}\n\nWeather?"


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_gemma_trains_the_call_block_and_end_marker(family):
    encode = RowEncoder(family_tokenizer(family), MaskOptions(tools_as_text=True))
    ((text, trained),) = encode.sequences(README_ROW, "chosen")
    assert trained == ["```python\nprint(17 * 23 + 5)\n```<end_of_turn>", "The answer is \\boxed{396}.<end_of_turn>"]
    # the schemas, the question and the result are in the text, masked
    assert f"<start_of_turn>user\n{TOOLS_HEADER}\n{SCHEMA_LINE}\n\nWhat is 17 * 23 + 5?<end_of_turn>" in text
    assert "<start_of_turn>user\n```output\n396\n```<end_of_turn>" in text


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_without_the_option_the_reason_names_the_missing_tool_support(family):
    from mtdpo.preprocess.rows import RowError

    with pytest.raises(RowError, match=r"^the chat template has no tool support \(--tools-as-text"):
        RowEncoder(family_tokenizer(family), MaskOptions())(README_ROW)


def test_unpaired_rows_keep_their_prompt():
    row = {"tools": [PYTHON_TOOL], "prompt": README_ROW["prompt"], "completion": README_ROW["chosen"], "label": True}
    unpaired = to_unpaired(row, tools_as_text=True)
    assert unpaired.n_prompt == 1 and unpaired.tools is None
    assert unpaired.messages[0]["content"].startswith(TOOLS_HEADER)
    assert [m["role"] for m in unpaired.messages] == ["user", "assistant", "user", "assistant"]


def test_cli_names_the_option_then_keeps_the_rows_with_it(tmp_path):
    rows = [row for k, row in enumerate(agent_rows(9)) if k in TOOL_SHAPES]
    assert all(row["tools"] == TOOLS for row in rows)
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    out = tmp_path / "cache"
    reason = "the chat template has no tool support (--tools-as-text writes tool calls and results as text)"
    result = invoke("preprocess", data, "--chat-template", "gemma3", "--out", out, "-q")
    assert_user_error(
        result, f"{data}: kept 0 of 6 rows (6 {reason}); no cache written; the rejects are in {out}.rejects.jsonl"
    )
    result = invoke("preprocess", data, "--chat-template", "gemma3", "--out", out, "-q", "--strict")
    assert_user_error(
        result,
        f"row 0: {reason}: chat template error: Conversation roles must alternate user/assistant/user/assistant/... "
        "(--strict stops at the first bad row)",
    )
    result = invoke("preprocess", data, "--chat-template", "gemma3", "--out", out, "-q", "--tools-as-text")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.counts["kept"] == 6 and manifest.tools_as_text
    assert '"tools_as_text": true' in (out / "manifest.json").read_text()


def test_masking_doc_quotes_the_tools_as_text_table():
    import sys

    from helpers import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import tool_use_table

    doc = (REPO / "docs" / "MASKING.md").read_text(encoding="utf-8")
    assert tool_use_table.markdown(70, "openai", tools_as_text=True) in doc
