"""The independent oracle (tests/oracle.py) on hand-worked examples, the checker that compares a
cache with it (scripts/template_table.py), and, marked slow, the check of mtdpo on every family."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from agent_rows import agent_rows, qa_rows
from helpers import ALL_FAMILIES, IGNORE, family_tokenizer, msg
from oracle import prepare, row_turns, side_turns

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_table():
    """scripts/template_table.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("template_table", SCRIPTS / "template_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def turns_of(family: str, messages: list[dict], n_prompt: int, tools=None):
    return side_turns(family_tokenizer(family), ALL_FAMILIES[family], messages, n_prompt, tools)


# ── hand-worked turns ─────────────────────────────────────────────────────────

GEMMA_TWO_TURNS = [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye"), msg("assistant", "See you.")]


def test_gemma_two_turns_by_hand():
    tok = family_tokenizer("gemma")
    first, second = turns_of("gemma", GEMMA_TWO_TURNS, n_prompt=1)
    context1 = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    completion1 = "Hello!<end_of_turn>"  # the "\n" the template writes after the marker is not generated
    context2 = context1 + completion1 + "\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    assert (first.context, first.completion) == (context1, completion1)
    assert (second.context, second.completion) == (context2, "See you.<end_of_turn>")
    assert first.context_ids == ids(tok, context1) and first.completion_ids == ids(tok, completion1)
    assert second.context_ids + second.completion_ids == ids(tok, context2 + "See you.<end_of_turn>")
    assert first.context_ids[0] == tok.bos_token_id and first.context_ids.count(tok.bos_token_id) == 1
    assert first.ok and second.ok and first.note is None


RAW_THINK = [msg("user", "2+2?"), msg("assistant", "Two and two.\n</think>\n\n4"), msg("user", "3+3?"),
             msg("assistant", "Three and three.\n</think>\n\n6")]  # fmt: skip


def test_qwq_raw_output_after_the_think_opener_by_hand():
    """QwQ's generation prompt opens `<think>\\n`; a message holding the model's raw output (the
    rest of the block, `</think>`, the answer) is what the model wrote after it. History drops
    the block, so each turn has its own context."""
    first, second = turns_of("qwq", RAW_THINK, n_prompt=1)
    assert first.context == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert first.completion == "Two and two.\n</think>\n\n4<|im_end|>"
    assert second.context.endswith("<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n"
                                   "<|im_start|>assistant\n<think>\n")  # fmt: skip
    assert second.completion == "Three and three.\n</think>\n\n6<|im_end|>"
    assert first.ok and second.ok and "opens <think>" in first.note


def test_qwq_message_without_the_rest_of_the_block_is_not_expressible():
    """An answer without `</think>`: what the model wrote inside the block is lost."""
    (turn,) = turns_of("qwq", [msg("user", "2+2?"), msg("assistant", "4")], n_prompt=1)
    assert not turn.ok and "generation prompt" in turn.problem


def test_a_shared_assistant_turn_is_prompt_not_a_turn():
    (only,) = turns_of("gemma", GEMMA_TWO_TURNS, n_prompt=3)
    assert only.message == 3


def test_qwen3_earlier_think_block_dropped_gives_the_turn_its_own_context():
    """Qwen3 keeps reasoning only after the last user message: once a user turn follows, the first
    answer is rendered without its <think> block, so the second turn's context is not the first
    turn's context + completion: it has a context of its own."""
    messages = [msg("user", "2+2?"), {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
                msg("user", "3+3?"), {"role": "assistant", "content": "6", "reasoning_content": "three and three"}]  # fmt: skip
    first, second = turns_of("qwen3", messages, n_prompt=1)
    assert first.context.endswith("<|im_start|>assistant\n")
    assert first.completion == "<think>\ntwo and two\n</think>\n\n4<|im_end|>"
    assert not second.context.startswith(first.context + first.completion)
    assert "<|im_start|>assistant\n4<|im_end|>" in second.context and "two and two" not in second.context
    assert second.completion == "<think>\nthree and three\n</think>\n\n6<|im_end|>"


def test_json_string_arguments_are_parsed_before_rendering():
    call = {"id": "c00000001", "type": "function", "function": {"name": "f", "arguments": '{"x": "é"}'}}
    assert prepare([{"role": "assistant", "content": "", "tool_calls": [call]}])[0]["tool_calls"][0]["function"][
        "arguments"
    ] == {"x": "é"}
    (turn,) = turns_of(
        "qwen2", [msg("user", "go"), {"role": "assistant", "content": "", "tool_calls": [call]}], n_prompt=1
    )
    assert '"arguments": {"x": "é"}' in turn.completion and turn.completion.endswith("</tool_call><|im_end|>")


def test_reasoning_is_aliased_to_thinking_for_gpt_oss():
    (turn,) = turns_of(
        "gpt-oss", [msg("user", "hi"), {"role": "assistant", "content": "Hello.", "reasoning_content": "greet"}], 1
    )
    # as the last message its reasoning is rendered (the model wrote it), and it ends <|return|>
    assert (
        turn.completion
        == "<|channel|>analysis<|message|>greet<|end|><|start|>assistant<|channel|>final<|message|>Hello.<|return|>"
    )
    assert prepare([{"role": "assistant", "content": "x", "reasoning_content": "r"}])[0]["thinking"] == "r"


def test_glm_turns_end_with_the_next_role_token():
    """GLM has no end-of-turn marker: a call is closed by <|observation|>, an answer by <|user|>."""
    call = {"id": "c00000001", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    messages = [msg("user", "go"), {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c00000001", "name": "f", "content": "ok"}, msg("assistant", "Done.")]  # fmt: skip
    first, second = turns_of("glm4.6", messages, n_prompt=1)
    assert first.context.endswith("<|assistant|>") and first.completion.endswith("</tool_call><|observation|>")
    assert second.completion == "\n<think></think>\nDone.<|user|>"
    assert first.ok and second.ok


def test_command_r7b_text_after_the_last_message_is_not_a_completion():
    (turn,) = turns_of("command-r7b", [msg("user", "hi"), msg("assistant", "Hello.")], 1)
    assert turn.completion == "<|START_RESPONSE|>Hello.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"
    assert turn.context.endswith("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")


def test_hermes_history_rendered_differently_takes_the_completion_after_the_prompt():
    """After a tool result Hermes' generation context ends '</tool_response><|im_end|><|im_start|>
    assistant\\n' while the whole conversation has '</tool_response>\\n<|im_end|>': the context is
    what the model saw, the completion is the message after the header."""
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    call = {"id": "c00000001", "type": "function", "function": {"name": "f", "arguments": {}}}
    messages = [msg("user", "go"), {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c00000001", "name": "f", "content": "ok"}, msg("assistant", "Done.")]  # fmt: skip
    first, second = turns_of("hermes3", messages, 1, tools)
    assert second.context.endswith("ok\n</tool_response><|im_end|><|im_start|>assistant\n")
    assert second.completion == "Done.<|im_end|>" and second.note and second.ok


def test_qwq_answer_without_its_reasoning_is_not_expressible():
    """QwQ's generation prompt opens '<think>\\n'; a message whose content has no think block is
    rendered without it, so what the model wrote after the opener is not in the message."""
    (plain,) = turns_of("qwq", [msg("user", "hi"), msg("assistant", "Hello.")], 1)
    assert not plain.ok and "generation prompt" in plain.problem
    (inline,) = turns_of("qwq", [msg("user", "hi"), msg("assistant", "<think>\ngreet\n</think>\n\nHello.")], 1)
    assert inline.ok and inline.completion == "greet\n</think>\n\nHello.<|im_end|>"


def test_parts_the_template_does_not_render_are_listed():
    """Kimi-K2's July 2025 template renders no tool calls: the call-only turn is expressible (an
    empty answer), and the oracle says what it leaves out."""
    call = {"id": "c00000001", "type": "function", "function": {"name": "get_weather", "arguments": {}}}
    (turn,) = turns_of("kimi-k2", [msg("user", "go"), {"role": "assistant", "content": "", "tool_calls": [call]}], 1)
    assert turn.ok and turn.completion == "<|im_end|>" and turn.dropped == ["tool call 0"]
    (full,) = turns_of("qwen2", [msg("user", "go"), {"role": "assistant", "content": "", "tool_calls": [call]}], 1)
    assert full.dropped == []


def test_a_template_error_makes_the_turn_not_expressible():
    (turn,) = turns_of("gemma", [msg("system", "s"), msg("user", "hi"), msg("assistant", "Hello.")], 2)
    assert not turn.ok and "template raises" in turn.problem


def test_phi35_rstrip_tokens_split_where_the_context_ends():
    """Phi-3.5's <|assistant|> and <|end|> swallow the newline after them (rstrip): the context's
    last token covers '\\n', and the joint encoding still splits exactly there."""
    tok = family_tokenizer("phi3.5-real")
    (turn,) = turns_of("phi3.5-real", [msg("user", "hi"), msg("assistant", "Hello.")], 1)
    assert turn.context.endswith("<|assistant|>\n") and turn.completion == "Hello.<|end|>"
    assert turn.context_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert turn.context_ids + turn.completion_ids == ids(tok, turn.context + turn.completion)


# ── the checker ───────────────────────────────────────────────────────────────


def gemma_sequence(trained: list[tuple[int, int]] | None = None):
    """The whole two-turn Gemma conversation as one sequence, trained where the oracle says
    (or on the given spans)."""
    tok = family_tokenizer("gemma")
    turns = turns_of("gemma", GEMMA_TWO_TURNS, 1)
    whole = turns[1].context_ids + turns[1].completion_ids
    spans = trained or [(len(t.context_ids), len(t.context_ids) + len(t.completion_ids)) for t in turns]
    labels = [IGNORE] * len(whole)
    for a, b in spans:
        labels[a:b] = whole[a:b]
    return tok, turns, {"input_ids": whole, "labels": labels}


def test_checker_accepts_the_oracle_mask_and_refuses_others():
    table = load_table()
    _, turns, right = gemma_sequence()
    assert table.match_side([right], turns) == ([True], [])
    (a1, b1), (a2, b2) = table.trained_runs(right["input_ids"], right["labels"])
    header_trained = gemma_sequence([(a1 - 3, b1), (a2, b2)])[2]  # "<start_of_turn>model\n" trained too
    ok, problems = table.match_side([header_trained], turns)
    assert ok == [False] and any("matches no oracle turn" in p for p in problems)
    dropped = gemma_sequence([(a2, b2)])[2]
    ok, problems = table.match_side([dropped], turns)
    assert ok == [False] and "message 1: trained 0 times" in problems
    ok, problems = table.match_side([right, right], turns)  # every turn trained twice
    assert ok == [False, False] and "message 3: trained 2 times" in problems


def test_checker_accepts_a_side_split_into_sequences():
    table = load_table()
    _, turns, _ = gemma_sequence()
    first = turns[0].context_ids + turns[0].completion_ids
    one = {"input_ids": first, "labels": [IGNORE] * len(turns[0].context_ids) + turns[0].completion_ids}
    whole = turns[1].context_ids + turns[1].completion_ids
    two = {"input_ids": whole, "labels": [IGNORE] * len(turns[1].context_ids) + turns[1].completion_ids}
    assert table.match_side([one, two], turns) == ([True, True], [])


def test_agent_rows_are_deterministic_and_cover_the_shapes():
    rows = agent_rows(60)
    assert rows == agent_rows(60) and len(rows) == 60 and rows != agent_rows(60, seed=1)
    assert json.loads(json.dumps(rows)) == rows
    messages = [m for r in rows for side in ("chosen", "rejected") for m in r[side]]
    calls = [c for m in messages for c in m.get("tool_calls") or []]
    assert any(isinstance(c["function"]["arguments"], str) for c in calls) and any(
        isinstance(c["function"]["arguments"], dict) for c in calls
    )
    assert any(m.get("content") is None for m in messages) and any(
        m.get("content") == "" and m.get("tool_calls") for m in messages
    )
    assert any(len(m.get("tool_calls") or []) >= 2 for m in messages) and any(
        "reasoning_content" in m for m in messages
    )
    assert any("tools" not in r for r in rows) and any(r["chosen"][0]["role"] == "system" for r in rows)
    assert all(len(c["id"]) == 9 for c in calls) and any(
        any(ord(ch) > 127 for ch in m["content"] or "") for m in messages
    )
    for r in rows:  # both sides share the system + first user prompt and part at an assistant turn
        n = next(k for k, (a, b) in enumerate(zip(r["chosen"], r["rejected"])) if a != b)
        assert (
            r["chosen"][n]["role"] == r["rejected"][n]["role"] == "assistant" and r["chosen"][n - 1]["role"] != "system"
        )
    assert all(len(r["chosen"]) == 2 or r["chosen"][0]["role"] == "system" for r in qa_rows(6))


def test_every_family_has_expressible_turns_on_the_agent_rows():
    """The oracle is not vacuous: every real agent family expresses some turns of the rows."""
    rows = agent_rows(16)
    for family, spec in ALL_FAMILIES.items():
        if spec.get("suite") != "real-agent":
            continue
        tok = family_tokenizer(family)
        good = sum(t.ok for row in rows for side in row_turns(tok, spec, row).values() for t in side)
        assert good > 0, family


# ── mtdpo against the oracle, every family ────────────────────────────────────


@pytest.mark.slow
def test_no_template_trains_a_silently_wrong_sequence(tmp_path):
    """Every real template, 60 agent rows: no kept sequence differs from the oracle, and no kept
    sequence holds a turn the oracle cannot express."""
    table = load_table()
    rows = agent_rows(60)
    results = [table.check_family(family, rows, tmp_path / family) for family in ALL_FAMILIES]
    wrong = {
        r["family"]: (r["silently_wrong"], r["kept_inexpressible"])
        for r in results
        if r["silently_wrong"] or r["kept_inexpressible"]
    }
    assert not wrong, table.markdown(results)
    assert sum(r["right"] for r in results) > 1500  # and most rows are kept


@pytest.mark.parametrize("family", ["qwen3", "glm4.6"])
def test_irregular_families_train_what_the_oracle_expects(tmp_path, family):
    """The fast version, on the families whose turn ends or contexts are irregular."""
    table = load_table()
    result = table.check_family(family, agent_rows(9), tmp_path / family)
    assert result["silently_wrong"] == 0 and result["kept_inexpressible"] == 0 and result["right"] > 0, result
