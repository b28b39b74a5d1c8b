"""Agent conversations (DESIGN.md, "Input" and "The masking rule"): tool calls, tool schemas,
reasoning and content parts are trained as exactly what the model generates.

The first tests are the six failures of the previous rule (issue 11), each with its expected
trained text written out by hand from the real template's output.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace

import pytest
from helpers import IGNORE, REPO, RowEncoder, decoded_runs, family_tokenizer, msg
from jinja2 import TemplateError

from mtdpo.cache import PairRecord
from mtdpo.preprocess.records import NO_TOOL_SUPPORT, MaskOptions, RecordBuilder
from mtdpo.preprocess.rows import RowError, to_pair
from mtdpo.preprocess.spans import TokenBounds, check_spans, generation_turns, sequences
from mtdpo.preprocess.template import ChatTemplate

sys.path.insert(0, str(REPO / "scripts"))  # tool_use_table, the generated set's table
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
    record, _ = RowEncoder(tok, MaskOptions())(row)
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
    assert decoded_runs(tok, ids, labels)[0].startswith(
        '17*23\n<tool_call>\n{"name": "python", "arguments": {"code": "print(17*23)"}}'
    )


@pytest.mark.parametrize("content", ["", None])
def test_call_only_turn_is_kept(content):
    """Failure 3: `"content": ""` plus tool_calls was rejected as empty content."""
    tok = family_tokenizer("qwen2")
    row = agent_pair(calling(content, call("python", {"code": "print(17 * 23)"})))
    assert (
        chosen_runs(tok, row)[0]
        == '<tool_call>\n{"name": "python", "arguments": {"code": "print(17 * 23)"}}\n</tool_call><|im_end|>'
    )


def test_row_tools_are_rendered_into_the_system_block_and_masked():
    """Failure 4: `tools` was never given to the template."""
    tok = family_tokenizer("qwen2")
    row = agent_pair(calling("", call("python", {"code": "print(17 * 23)"})), tools=[PYTHON_TOOL])
    record = encode(tok, row)
    for side in ("chosen", "rejected"):
        ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
        text = tok.decode(ids)
        assert text.startswith(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n"
        )
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
    [
        ("gemma", "<start_of_turn>model\n", "<end_of_turn>"),
        ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    ],
)
def test_trimming_template_does_not_train_the_header_newline(family, header, eot):
    """Failure 6: content starting with "\\n" trained the role header's own newline."""
    tok = family_tokenizer(family)
    row = {
        "chosen": [msg("user", "What is 2 + 3?"), msg("assistant", "\nIt is 5.")],
        "rejected": [msg("user", "What is 2 + 3?"), msg("assistant", "\n\nIt is 6.")],
    }
    record = encode(tok, row)
    for side, answer in (("chosen", "It is 5."), ("rejected", "It is 6.")):
        ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
        assert decoded_runs(tok, ids, labels) == [answer + eot]
        first = next(k for k, label in enumerate(labels) if label != IGNORE)
        assert tok.decode(ids[:first]).endswith(header)


# ── input validation ──────────────────────────────────────────────────────────

BAD_AGENT_ROWS = {
    "image part": (
        agent_pair(
            msg("assistant", "x"),
            chosen=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]},
                msg("assistant", "x"),
            ],
        ),
        "chosen[0] (user) content part 0 has type 'image_url': only text parts can be trained (mtdpo is text-only)",
    ),
    "call without function": (
        agent_pair(calling("", {"name": "python"})),
        'chosen[1] tool_calls[0] has no "function" object (expected {"type": "function", "function": {"name": ..., "arguments": ...}})',
    ),
    "bad JSON arguments": (
        agent_pair(calling("", call("python", "{code: 1"))),
        "chosen[1] tool_calls[0] arguments is a string that is not valid JSON",
    ),
    "number arguments": (
        agent_pair(calling("", call("python", 5))),
        "chosen[1] tool_calls[0] arguments is a number, expected an object or a JSON string",
    ),
    # Python's json reads NaN and Infinity; the reason used to be "its tool call 0 name is not in the rendered turn"
    "NaN in arguments": (
        agent_pair(calling("", call("python", {"x": float("nan")}))),
        "chosen[1] tool_calls[0] arguments hold NaN/Infinity, which JSON cannot carry",
    ),
    "Infinity in JSON-string arguments": (
        agent_pair(calling("", call("python", {"x": 1}), call("python", '{"limits": [1, -Infinity]}'))),
        "chosen[1] tool_calls[1] arguments hold NaN/Infinity, which JSON cannot carry",
    ),
    "tool_calls not a list": (
        agent_pair(calling("", call("python", {})))
        | {"chosen": [QUESTION, {"role": "assistant", "content": "", "tool_calls": {"a": 1}}]},
        "chosen[1] tool_calls is an object, expected a list",
    ),
    "null user content": (
        agent_pair(msg("assistant", "x"), chosen=[{"role": "user", "content": None}, msg("assistant", "x")]),
        "chosen[0] (user) content is null, expected a string or a list of text parts (null only with tool_calls)",
    ),
    "tools differ": (
        agent_pair(msg("assistant", "x"), chosen_tools=[PYTHON_TOOL], rejected_tools=[]),
        "chosen_tools and rejected_tools differ: both sides must answer with the same tools",
    ),
    "tools not a list": (
        agent_pair(msg("assistant", "x"), tools={"python": 1}),
        "tools is an object, expected a list of JSON schema objects",
    ),
    "kwargs not an object": (
        agent_pair(msg("assistant", "x"), chat_template_kwargs=True),
        "chat_template_kwargs is a boolean, expected an object",
    ),
    "kwargs set tools": (
        agent_pair(msg("assistant", "x"), chat_template_kwargs={"tools": []}),
        "chat_template_kwargs may not set tools: mtdpo renders those itself",
    ),
    "reasoning not a string": (
        agent_pair({"role": "assistant", "content": "x", "reasoning_content": 3}),
        "chosen[1] reasoning_content is a number, expected a string",
    ),
}


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
    pair = to_pair(
        agent_pair(msg("assistant", "x"), tools=[PYTHON_TOOL], chat_template_kwargs={"enable_thinking": False})
    )
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
    from helpers import with_template

    tok = with_template("qwen2", DROPS_CALLS)
    row = agent_pair(calling("Let me compute it.", call("python", {"code": "print(17 * 23)"})))
    with pytest.raises(
        RowError,
        match=rf"^{re.escape(NO_TOOL_SUPPORT)}: message 1 \(assistant\): its tool call 0 name is not in the rendered turn",
    ):
        encode(tok, row)


def test_span_functions_on_one_conversation():
    """The pure interface: renders -> turns in their generation contexts -> sequences -> self-check."""
    tok = family_tokenizer("qwen2")
    chat = ChatTemplate(tok)
    messages = agent_pair(calling("", call("python", {"code": "1"})))["chosen"]
    render = chat.renderer()
    text = render(messages)
    turns = generation_turns(chat, render, messages, 1, text)
    assert [t.message for t in turns] == [1, 3]
    assert turns[0].context.endswith("<|im_start|>assistant\n")
    assert turns[0].completion == '<tool_call>\n{"name": "python", "arguments": {"code": "1"}}\n</tool_call><|im_end|>'
    (sequence,) = sequences(turns, text)  # prefix-stable: one sequence, the whole render
    assert sequence.text == text and text[sequence.spans[0].end] == "\n"  # the template's newline: not trained
    spans = sequence.spans
    assert text[spans[0].start : spans[0].end] == turns[0].completion
    encoded = RecordBuilder(tok, MaskOptions()).encoder.encode(text)
    tokens = TokenBounds.of(encoded.starts, encoded.ends)
    check_spans(text, tokens, messages, spans)  # passes
    inside_a_token = replace(spans[0], start=spans[0].start + 1)  # inside <tool_call>
    with pytest.raises(RowError, match="first character shares a token with its context"):
        check_spans(text, tokens, messages, [inside_a_token])
    with pytest.raises(RowError, match="end-of-turn marker shares a token with the next text"):
        check_spans(text, tokens, messages, [replace(spans[0], end=spans[0].end - 1)])


# ── real templates with tool calls (tests/templates, families.json) ──────────


def qwen3_trajectory(reasoning: bool) -> dict:
    think = {"reasoning_content": "Multiply."} if reasoning else {}
    answer = {"reasoning_content": "The tool says 391."} if reasoning else {}
    chosen = [
        QUESTION,
        {**calling("", call("python", {"code": "print(17 * 23)"})), **think},
        tool_result("391"),
        {**msg("assistant", "It is $\\boxed{391}$."), **answer},
    ]
    return {"chosen": chosen, "rejected": [QUESTION, msg("assistant", "It is $\\boxed{401}$.")], "tools": [PYTHON_TOOL]}


QWEN3_CALL = '<tool_call>\n{"name": "python", "arguments": {"code": "print(17 * 23)"}}\n</tool_call><|im_end|>'


def test_qwen3_reasoning_and_calls_after_the_last_user_turn():
    tok = family_tokenizer("qwen3")
    assert chosen_runs(tok, qwen3_trajectory(reasoning=True)) == [
        "<think>\nMultiply.\n</think>\n\n" + QWEN3_CALL,
        "<think>\nThe tool says 391.\n</think>\n\nIt is $\\boxed{391}$.<|im_end|>",
    ]


def test_qwen3_without_reasoning_trains_each_turn_as_it_was_generated():
    """Qwen3 gives the last message an empty <think> block: the first call was generated with one
    (it was last then), but the conversation renders it without. So the call is trained in its
    own sequence, with its block, and the final answer, last in both, in the whole render."""
    tok = family_tokenizer("qwen3")
    row = qwen3_trajectory(reasoning=False)
    whole = tok.apply_chat_template(row["chosen"], tools=row["tools"], tokenize=False)
    assert "assistant\n<tool_call>" in whole
    (first, first_runs), (second, second_runs) = RowEncoder(tok).sequences(row)
    assert first_runs == ["<think>\n\n</think>\n\n" + QWEN3_CALL]
    assert second == whole and second_runs == ["<think>\n\n</think>\n\nIt is $\\boxed{391}$.<|im_end|>"]


def test_qwen3_enable_thinking_false_puts_the_empty_block_in_the_prompt():
    tok = family_tokenizer("qwen3")
    row = qwen3_trajectory(reasoning=False) | {"chat_template_kwargs": {"enable_thinking": False}}
    record = encode(tok, row)
    ids, labels = record["rejected_input_ids"], record["rejected_labels"]
    first = next(k for k, label in enumerate(labels) if label != IGNORE)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the generation prompt
    assert decoded_runs(tok, ids, labels) == ["It is $\\boxed{401}$.<|im_end|>"]
    assert decoded_runs(tok, record["chosen_input_ids"], record["chosen_labels"]) == [
        QWEN3_CALL,
        "It is $\\boxed{391}$.<|im_end|>",
    ]


def test_qwen3_dropping_reasoning_across_user_turns_keeps_it_where_it_was_generated():
    tok = family_tokenizer("qwen3")
    row = qwen3_trajectory(reasoning=True)
    follow = [msg("user", "And 17 * 24?"), msg("assistant", "408")]
    row = row | {side: row[side] + follow for side in ("chosen", "rejected")}
    whole = tok.apply_chat_template(row["chosen"], tools=row["tools"], tokenize=False)
    assert "Multiply." not in whole  # the template drops it from the history
    (first, first_runs), (second, second_runs) = RowEncoder(tok).sequences(row)
    assert first_runs[0] == "<think>\nMultiply.\n</think>\n\n" + QWEN3_CALL  # trained with its reasoning, once
    assert second == whole and second_runs == ["<think>\n\n</think>\n\n408<|im_end|>"]


def test_qwen3_null_content_is_a_template_error():
    """A null content is dropped before rendering, as apply_chat_template drops it; Qwen3's
    template then tests `'</think>' in content` and raises: call-only turns need content ""."""
    tok = family_tokenizer("qwen3")
    row = agent_pair(calling(None, call("python", {"code": "print(17 * 23)"})))
    with pytest.raises(RowError, match="^chat template error: "):
        encode(tok, row)
    messages = agent_pair(calling(None, call("python", {"code": "1"})))["chosen"]
    with pytest.raises(TemplateError):  # transformers' own rendering fails the same way
        tok.apply_chat_template(messages, tokenize=False)


LLAMA_CALL = '{"name": "python", "parameters": {"code": "print(17 * 23)"}}'


def test_llama31_json_call_ipython_result_and_eot():
    tok = family_tokenizer("llama3")
    row = agent_pair(calling("", call("python", {"code": "print(17 * 23)"})), tools=[PYTHON_TOOL])
    record = encode(tok, row)
    ids, labels = record["chosen_input_ids"], record["chosen_labels"]
    assert decoded_runs(tok, ids, labels) == [LLAMA_CALL + "<|eot_id|>", "It is $\\boxed{391}$.<|eot_id|>"]
    text = tok.decode(ids)
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"391"<|eot_id|>' in text  # JSON-encoded, masked
    assert (
        "Given the following functions" in text and '"name": "python"' in text.split("<|eot_id|>")[1]
    )  # tools in the first user turn


def test_llama31_builtin_tool_call_ends_with_eom():
    """With builtin_tools the call is `<|python_tag|>…` and the turn ends with <|eom_id|>."""
    tok = family_tokenizer("llama3")
    kwargs = {"builtin_tools": ["brave_search"]}
    row = agent_pair(calling("", call("brave_search", {"query": "17 * 23"})), chat_template_kwargs=kwargs)
    assert chosen_runs(tok, row) == [
        '<|python_tag|>brave_search.call(query="17 * 23")<|eom_id|>',
        "It is $\\boxed{391}$.<|eot_id|>",
    ]


def test_llama31_drops_the_content_of_a_calling_turn_so_the_row_is_rejected():
    tok = family_tokenizer("llama3")
    row = agent_pair(calling("Let me compute it.", call("python", {"code": "print(17 * 23)"})))
    with pytest.raises(RowError, match=r"^message 1 \(assistant\): its text is not in the rendered turn"):
        encode(tok, row)


def test_mistral_v03_tool_calls_and_results():
    tok = family_tokenizer("mistral3")
    row = agent_pair(calling("", call("python", {"code": "print(17 * 23)"}, "abc123xyz")), tools=[PYTHON_TOOL])
    row["chosen"][2] = tool_result("391", "abc123xyz")
    record = encode(tok, row)
    ids, labels = record["chosen_input_ids"], record["chosen_labels"]
    assert decoded_runs(tok, ids, labels) == [
        '[TOOL_CALLS] [{"name": "python", "arguments": {"code": "print(17 * 23)"}, "id": "abc123xyz"}]</s>',
        " It is $\\boxed{391}$.</s>",
    ]
    assert '[TOOL_RESULTS] {"content": 391, "call_id": "abc123xyz"}[/TOOL_RESULTS]' in tok.decode(ids)
    assert tok.decode(ids).startswith("<s>[AVAILABLE_TOOLS] [")


def test_deepseek_v3_call_only_turns_fail_as_apply_chat_template_fails():
    """DeepSeek-V3's template renders calls only for `content is none`, but a null content is
    dropped before rendering (apply_chat_template drops it too): the template then adds an
    undefined content to a string and raises. With content "" it renders an empty answer and
    no call: rejected by the self-check, never trained as an answer."""
    tok = family_tokenizer("deepseek3")
    row = agent_pair(calling(None, call("python", {"code": "print(17 * 23)"})))
    with pytest.raises(RowError, match="^chat template error: "):
        encode(tok, row)
    with pytest.raises(TemplateError):
        tok.apply_chat_template(row["chosen"], tokenize=False)
    empty = agent_pair(calling("", call("python", {"code": "print(17 * 23)"})))  # renders as an empty answer
    with pytest.raises(RowError, match=r"^message 1 \(assistant\): its tool call 0 name is not in the rendered turn"):
        encode(tok, empty)


# ── show-sample and stats know tool calls ─────────────────────────────────────


def test_turn_view_labels_tool_calls_and_tool_results():
    from mtdpo import show

    expected = {
        "qwen2": ["system", "user", "assistant (tool call)", "tool", "assistant"],
        # Qwen3: the call in its own generation context (it was last then), then the whole conversation
        "qwen3": [
            "system",
            "user",
            "assistant (tool call)",
            "system",
            "user",
            "assistant (tool call)",
            "tool",
            "assistant",
        ],
        "llama3": ["system", "user", "assistant (tool call)", "tool", "assistant"],
        "mistral3": ["user", "assistant (tool call)", "tool", "assistant"],
    }
    for family, roles in expected.items():
        tok = family_tokenizer(family)
        row = agent_pair(calling("", call("python", {"code": "print(17 * 23)"}, "abc123xyz")), tools=[PYTHON_TOOL])
        row["chosen"][2] = tool_result("391", "abc123xyz")
        record = {**encode(tok, row), "row": 0}
        view = show.build_view(PairRecord.from_row(record), tok, 0, ["chosen"])
        assert [turn.role for turn in view.sides[0].turns] == roles, family


def test_stats_counts_trained_tool_calls_per_side(tmp_path):
    from helpers import run_preprocess, write_jsonl

    from mtdpo.stats import cache_stats
    from mtdpo.synthetic import make_tool_pairs

    family_tokenizer("qwen2").save_pretrained(str(tmp_path / "qwen2"))
    rows = [row for row in make_tool_pairs(14) if row["shape"] != "reasoning"]  # Qwen2.5 does not render reasoning
    run_preprocess(write_jsonl(tmp_path / "tools.jsonl", rows), tmp_path / "cache", tokenizer=str(tmp_path / "qwen2"))
    stats = cache_stats(tmp_path / "cache")
    assert stats["counts"]["kept"] == len(rows) == 12
    for side in ("chosen", "rejected"):  # every call is after the shared question, so all are trained
        calls = [sum(len(m.get("tool_calls", [])) for m in row[side]) for row in rows]
        assert stats["tokens"]["tool_calls"][side] == sum(calls)
        assert stats["tool_calls"][side]["max"] == max(calls) == 2 and stats["tool_calls"][side]["min"] == 1


# ── packaged templates: --chat-template NAME ──────────────────────────────────

PACKAGED = {
    "gemma2": "gemma",
    "gemma3": "gemma3",
    "llama3.1": "llama3",
    "llama3.2": "llama3.2",
    "qwen2.5": "qwen2",
    "qwen3": "qwen3",
    "mistral-v0.3": "mistral3",
    "deepseek-v3": "deepseek3",
    "phi3.5": "phi3",
    # agent families (tests/templates/families.json records each source)
    "llama3.3": "llama3",  # byte-identical to 3.1's
    "gpt-oss": "gpt-oss",
    "hermes3": "hermes3",
    "mistral-small3.2": "mistral-small3.2",
    "mistral-nemo": "mistral-nemo",
    "deepseek-r1-distill": "r1-distill",
    "deepseek-v3.1": "deepseek3.1",
    "glm4.6": "glm4.6",
    "command-r7b": "command-r7b",
    "granite3.3": "granite3.3",
    "phi4-mini": "phi4-mini",
    "qwq": "qwq",
    "kimi-k2": "kimi-k2",
    "seed-oss": "seed-oss",
    "nemotron-nano2": "nemotron-nano2",
    "smollm3": "smollm3",
    "olmo2": "olmo2",
}


def test_packaged_templates_are_the_tested_real_ones():
    from helpers import TEMPLATES

    from mtdpo.assets import TEMPLATES as PACKAGED_DIR
    from mtdpo.assets import packaged_templates

    assert packaged_templates() == sorted(PACKAGED)
    for name, family in PACKAGED.items():
        assert (PACKAGED_DIR / f"{name}.jinja").read_text() == (TEMPLATES / f"{family}.jinja").read_text(), name


def test_chat_template_by_name_and_a_file_of_that_name_wins(tmp_path, monkeypatch):
    from mtdpo.assets import TEMPLATES as PACKAGED_DIR
    from mtdpo.errors import UsageError
    from mtdpo.preprocess.tokenizer import load_tokenizer

    tok = load_tokenizer(None, "gemma3")
    assert tok.chat_template == (PACKAGED_DIR / "gemma3.jinja").read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3").write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_tokenizer(None, "gemma3").chat_template.startswith("{{ bos_token }}{% for m")
    with pytest.raises(
        UsageError,
        match=r"^chat template not found: gemma4 is neither a file nor a packaged template \(command-r7b, deep",
    ):
        load_tokenizer(None, "gemma4")


def test_gemma3_template_masks_like_gemma2():
    """Gemma 3: a system message folded into the first user turn, trimmed contents, no tool role."""
    tok = family_tokenizer("gemma3")
    row = {
        "chosen": [msg("system", "Be brief."), QUESTION, msg("assistant", "\n391\n")],
        "rejected": [msg("system", "Be brief."), QUESTION, msg("assistant", "401")],
    }
    record = encode(tok, row)
    assert tok.decode(record["chosen_input_ids"]).startswith(
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is 17 * 23?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert decoded_runs(tok, record["chosen_input_ids"], record["chosen_labels"]) == ["391<end_of_turn>"]
    with pytest.raises(
        RowError, match=f"^{re.escape(NO_TOOL_SUPPORT)}: chat template error: Conversation roles must alternate"
    ):
        encode(tok, agent_pair(calling("", call("python", {"code": "1"}))))


# ── every family on the generated tool-use set (scripts/tool_use_table.py) ───


def reference_runs(tok, row: dict, side: str, n_prompt: int) -> list[str] | None:
    """The rule restated with apply_chat_template, for rows where both renders it needs are
    prefixes of the conversation (None otherwise): per post-prompt assistant message, the
    render through it after the render before it with the generation prompt, less trailing
    whitespace."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages, add_generation_prompt=False):  # transformers' renderer, keeping a null content
        variables = {**tok.special_tokens_map, **row.get("chat_template_kwargs", {})}
        return render_jinja_template(
            [messages],
            tools=row.get("tools"),
            chat_template=tok.chat_template,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )[0][0]

    messages = to_pair(row).chosen if side == "chosen" else to_pair(row).rejected
    text = render(messages)
    runs = []
    for i in range(n_prompt, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            return None
        runs.append(through[len(before) :].rstrip())
    return runs


# DeepSeek-V3 renders calls only for a null content, which apply_chat_template (and so mtdpo) drops.
@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral3"])
def test_generated_tool_use_rows_train_what_the_template_renders(family):
    import tool_use_table

    from mtdpo.synthetic import make_tool_pairs

    tok, encoder = family_tokenizer(family), RowEncoder(family_tokenizer(family), MaskOptions(max_length=1 << 20))
    checked = 0
    for row in make_tool_pairs(35):
        row = tool_use_table.restyle(row, family, "native")
        try:
            record, _ = encoder(row)
        except RowError:
            continue
        n_prompt = to_pair(row).n_prompt
        for side in ("chosen", "rejected"):
            runs = decoded_runs(tok, record[f"{side}_input_ids"], record[f"{side}_labels"])
            schema = PYTHON_TOOL["function"]["description"]
            assert not any(
                schema in run or "tool_response" in run or "TOOL_RESULTS" in run or "tool▁output" in run for run in runs
            )
            expected = reference_runs(tok, row, side, n_prompt)
            if expected is not None:
                assert runs == expected, (family, row["shape"], side)
                checked += 1
    assert checked >= 10, checked  # Qwen3's trajectories mostly need the fallback, which this reference cannot restate


def test_masking_doc_quotes_the_tool_use_table():
    import tool_use_table

    doc = (REPO / "docs" / "MASKING.md").read_text(encoding="utf-8")
    assert tool_use_table.markdown(70, "native") in doc


@pytest.mark.slow
def test_masking_doc_quotes_the_openai_style_tool_use_table():
    import tool_use_table

    doc = (REPO / "docs" / "MASKING.md").read_text(encoding="utf-8")
    assert tool_use_table.markdown(70, "openai") in doc


def test_llama32_tool_call_with_todays_date_in_the_system_block():
    """Llama 3.2 writes today's date (strftime_now) into every render: the same in each prefix."""
    tok = family_tokenizer("llama3.2")
    row = agent_pair(calling("", call("python", {"code": "print(17 * 23)"})), tools=[PYTHON_TOOL])
    record = encode(tok, row)
    ids, labels = record["chosen_input_ids"], record["chosen_labels"]
    assert "Today Date: " in tok.decode(ids) and "26 Jul 2024" not in tok.decode(ids)
    assert decoded_runs(tok, ids, labels) == [LLAMA_CALL + "<|eot_id|>", "It is $\\boxed{391}$.<|eot_id|>"]


# A DeepSeek-R1-style template: the generation prompt opens <think>, the conversation drops the
# reasoning of a rendered answer, so the generation prompt is not a prefix of the conversation.
OPENS_THINK = """
{%- for m in messages -%}
    {%- if m.role == 'user' -%}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' -}}
    {%- else -%}{{- '<|im_start|>assistant\\n' + m.content.split('</think>')[-1] + '<|im_end|>\\n' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}
"""


def test_a_generation_prompt_opening_text_the_message_lacks_is_rejected():
    """QwQ-style: the generation prompt opens `<think>\\n`, which the rendered message never
    holds: what the model wrote after it is not in the row, so the turn cannot be scored."""
    from helpers import with_template

    tok = with_template("qwen2", OPENS_THINK)
    row = {"chosen": [QUESTION, msg("assistant", "391")], "rejected": [QUESTION, msg("assistant", "401")]}
    with pytest.raises(RowError, match=r"^message 1 \(assistant\): its generation prompt ends with .*<think>\\n"):
        encode(tok, row)
