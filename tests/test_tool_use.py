"""Agent conversations (DESIGN.md, "Input" and "The masking rule"): tool calls, tool schemas,
reasoning and content parts are trained as exactly what the model generates.

The first tests are the six failures of the previous rule (issue 11), each with its expected
trained text written out by hand from the real template's output.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import IGNORE, decoded_runs, family_tokenizer, msg

from mtdpo.preprocess.encode import MaskOptions, PairEncoder
from mtdpo.preprocess.mask import ChatTemplate, assistant_spans, check_spans
from mtdpo.preprocess.rows import RowError, to_pair

QUESTION = msg("user", "What is 17 * 23?")
PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code and return what it prints.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
    },
}


def call(name: str, arguments, call_id: str = "call00001") -> dict:
    return {"type": "function", "id": call_id, "function": {"name": name, "arguments": arguments}}


def calling(content, *calls) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def tool_result(content: str, call_id: str = "call00001") -> dict:
    return {"role": "tool", "content": content, "tool_call_id": call_id}


def agent_pair(first: dict, **row) -> dict:
    """question → `first` (a tool call) → tool output → answer; rejected answers by hand."""
    chosen = [QUESTION, first, tool_result("391"), msg("assistant", "It is $\\boxed{391}$.")]
    return {"chosen": chosen, "rejected": [QUESTION, msg("assistant", "It is $\\boxed{401}$.")], **row}


def encode(tok, row: dict) -> dict:
    record, _ = PairEncoder(tok, MaskOptions())(row)
    return record


def chosen_runs(tok, row: dict) -> list[str]:
    record = encode(tok, row)
    return decoded_runs(tok, record["chosen_input_ids"], record["chosen_labels"])


# ── the six failures of the previous rule ──────────────────────────────────────


def test_qwen25_tool_call_text_and_end_marker_are_trained():
    """Failure 1: only the content was trained, the <tool_call> text and <|im_end|> masked."""
    tok = family_tokenizer("qwen2")
    row = agent_pair(calling("Let me compute it.", call("python", {"code": "print(17 * 23)"})))
    assert chosen_runs(tok, row) == [
        'Let me compute it.\n<tool_call>\n{"name": "python", "arguments": {"code": "print(17 * 23)"}}\n</tool_call><|im_end|>',
        "It is $\\boxed{391}$.<|im_end|>",
    ]


def test_content_repeated_inside_the_arguments_is_trained_where_it_is():
    """Failure 2: with content `17*23` inside `print(17*23)`, the JSON was trained instead."""
    tok = family_tokenizer("qwen2")
    row = agent_pair(calling("17*23", call("python", {"code": "print(17*23)"})))
    record = encode(tok, row)
    ids, labels = record["chosen_input_ids"], record["chosen_labels"]
    first = next(k for k, label in enumerate(labels) if label != IGNORE)
    assert tok.decode(ids[:first]).endswith("<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n")
    assert decoded_runs(tok, ids, labels)[0].startswith('17*23\n<tool_call>\n{"name": "python", "arguments": {"code": "print(17*23)"}}')


@pytest.mark.parametrize("content", ["", None])
def test_call_only_turn_is_kept(content):
    """Failure 3: `"content": ""` plus tool_calls was rejected as empty content."""
    tok = family_tokenizer("qwen2")
    row = agent_pair(calling(content, call("python", {"code": "print(17 * 23)"})))
    assert chosen_runs(tok, row)[0] == '<tool_call>\n{"name": "python", "arguments": {"code": "print(17 * 23)"}}\n</tool_call><|im_end|>'


def test_row_tools_are_rendered_into_the_system_block_and_masked():
    """Failure 4: `tools` was never given to the template."""
    tok = family_tokenizer("qwen2")
    row = agent_pair(calling("", call("python", {"code": "print(17 * 23)"})), tools=[PYTHON_TOOL])
    record = encode(tok, row)
    for side in ("chosen", "rejected"):
        ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n")
        assert '{"type": "function", "function": {"name": "python", "description": "Run Python code' in text
        assert not any("# Tools" in run or "description" in run for run in decoded_runs(tok, ids, labels))
    without = encode(tok, {key: value for key, value in row.items() if key != "tools"})
    assert len(record["chosen_input_ids"]) > len(without["chosen_input_ids"]) + 50


def test_content_as_text_parts_equals_the_joined_string():
    """Failure 5: content as a list of text parts was rejected."""
    tok = family_tokenizer("qwen2")
    parts = {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "17 * 23?"}]}
    row = agent_pair(calling("Let me compute it.", call("python", {"code": "print(17 * 23)"})))
    with_parts = {side: [parts, *row[side][1:]] for side in ("chosen", "rejected")}
    assert encode(tok, with_parts) == encode(tok, row)


@pytest.mark.parametrize(
    "family, header, eot",
    [("gemma", "<start_of_turn>model\n", "<end_of_turn>"), ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")],
)
def test_trimming_template_does_not_train_the_header_newline(family, header, eot):
    """Failure 6: content starting with "\\n" trained the role header's own newline."""
    tok = family_tokenizer(family)
    row = {"chosen": [msg("user", "What is 2 + 3?"), msg("assistant", "\nIt is 5.")], "rejected": [msg("user", "What is 2 + 3?"), msg("assistant", "\n\nIt is 6.")]}
    record = encode(tok, row)
    for side, answer in (("chosen", "It is 5."), ("rejected", "It is 6.")):
        ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
        assert decoded_runs(tok, ids, labels) == [answer + eot]
        first = next(k for k, label in enumerate(labels) if label != IGNORE)
        assert tok.decode(ids[:first]).endswith(header)


# ── input validation ──────────────────────────────────────────────────────────

BAD_AGENT_ROWS = {
    "image part": (
        agent_pair(msg("assistant", "x"), chosen=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}, msg("assistant", "x")]),
        "chosen[0] (user) content part 0 has type 'image_url': only text parts can be trained (mtdpo is text-only)",
    ),
    "call without function": (agent_pair(calling("", {"name": "python"})), 'chosen[1] tool_calls[0] has no "function" object (expected {"type": "function", "function": {"name": ..., "arguments": ...}})'),
    "bad JSON arguments": (agent_pair(calling("", call("python", "{code: 1"))), "chosen[1] tool_calls[0] arguments is a string that is not valid JSON"),
    "number arguments": (agent_pair(calling("", call("python", 5))), "chosen[1] tool_calls[0] arguments is a number, expected an object or a JSON string"),
    "tool_calls not a list": (agent_pair(calling("", call("python", {}))) | {"chosen": [QUESTION, {"role": "assistant", "content": "", "tool_calls": {"a": 1}}]}, "chosen[1] tool_calls is an object, expected a list"),
    "null user content": (agent_pair(msg("assistant", "x"), chosen=[{"role": "user", "content": None}, msg("assistant", "x")]), "chosen[0] (user) content is null, expected a string or a list of text parts (null only with tool_calls)"),
    "tools differ": (agent_pair(msg("assistant", "x"), chosen_tools=[PYTHON_TOOL], rejected_tools=[]), "chosen_tools and rejected_tools differ: both sides must answer with the same tools"),
    "tools not a list": (agent_pair(msg("assistant", "x"), tools={"python": 1}), "tools is an object, expected a list of JSON schema objects"),
    "kwargs not an object": (agent_pair(msg("assistant", "x"), chat_template_kwargs=True), "chat_template_kwargs is a boolean, expected an object"),
    "kwargs set tools": (agent_pair(msg("assistant", "x"), chat_template_kwargs={"tools": []}), "chat_template_kwargs may not set tools: mtdpo renders those itself"),
    "reasoning not a string": (agent_pair({"role": "assistant", "content": "x", "reasoning_content": 3}), "chosen[1] reasoning_content is a number, expected a string"),
}  # fmt: skip


@pytest.mark.parametrize("row, reason", list(BAD_AGENT_ROWS.values()), ids=list(BAD_AGENT_ROWS))
def test_bad_agent_rows_are_rejected_with_the_reason(row, reason):
    with pytest.raises(RowError) as err:
        to_pair(row)
    assert str(err.value) == reason


def test_reasoning_names_are_aliased_as_transformers_does():
    for key in ("reasoning_content", "thinking", "reasoning"):
        pair = to_pair(agent_pair({"role": "assistant", "content": "x", key: "Multiply."}))
        assert pair.chosen[1]["reasoning_content"] == pair.chosen[1]["thinking"] == "Multiply."


def test_tools_and_template_kwargs_reach_the_pair():
    pair = to_pair(agent_pair(msg("assistant", "x"), tools=[PYTHON_TOOL], chat_template_kwargs={"enable_thinking": False}))
    assert pair.tools == [PYTHON_TOOL] and pair.template_kwargs == {"enable_thinking": False}
    same = to_pair(agent_pair(msg("assistant", "x"), chosen_tools=[PYTHON_TOOL], rejected_tools=[PYTHON_TOOL]))
    assert same.tools == [PYTHON_TOOL]


def test_fast_renderer_passes_tools_and_kwargs_like_apply_chat_template():
    tok = family_tokenizer("qwen2")
    chat = ChatTemplate(tok)
    messages = agent_pair(calling("", call("python", {"code": "print(1)"})))["chosen"]
    for prompt in (False, True):
        assert chat.render(messages, prompt, [PYTHON_TOOL], {"custom": 1}) == tok.apply_chat_template(
            messages, tools=[PYTHON_TOOL], tokenize=False, add_generation_prompt=prompt, custom=1
        )


# ── the self-check ────────────────────────────────────────────────────────────

# A template that drops tool calls: the call is not in the trained span, the row is rejected.
DROPS_CALLS = """
{%- for m in messages -%}
    {{- '<|im_start|>' + m.role + '\\n' + (m.content or '') + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""


def test_template_that_drops_tool_calls_is_rejected():
    from conftest import with_template

    tok = with_template("qwen2", DROPS_CALLS)
    row = agent_pair(calling("Let me compute it.", call("python", {"code": "print(17 * 23)"})))
    with pytest.raises(RowError, match=r"^message 1 \(assistant\): its tool call 0 name is not in the rendered turn"):
        encode(tok, row)


def test_span_functions_on_one_conversation():
    """The pure interface: render -> character spans -> self-check, on hand-computed offsets."""
    tok = family_tokenizer("qwen2")
    chat = ChatTemplate(tok)
    messages = agent_pair(calling("", call("python", {"code": "1"})))["chosen"]
    render = chat.renderer()
    text = render(messages)
    spans = assistant_spans(render, messages, 1, text, chat.markers, chat.closing)
    assert [s.message for s in spans] == [1, 3]
    assert text[spans[0].start : spans[0].end] == '<tool_call>\n{"name": "python", "arguments": {"code": "1"}}\n</tool_call><|im_end|>'
    assert text[spans[0].end : spans[0].turn_end] == "\n"  # the template's newline after the marker
    assert text[: spans[0].start].endswith("<|im_start|>assistant\n") and spans[0].header_end == spans[0].start
    _, offsets = chat.tokenize(text)
    check_spans(text, offsets, messages, spans)  # passes
    inside_a_token = replace(spans[0], header_end=spans[0].start + 1, start=spans[0].start + 1)  # inside <tool_call>
    with pytest.raises(RowError, match="first character shares a token with the generation prompt"):
        check_spans(text, offsets, messages, [inside_a_token])
    with pytest.raises(RowError, match="renders text before its content that the mask would skip"):
        check_spans(text, offsets, messages, [replace(spans[0], start=spans[0].start + 1)])
