"""Row validation (mtdpo.preprocess.rows): every bad shape is a RowError whose message is
the reason written to rejects.jsonl; both accepted shapes mask the same way."""

from __future__ import annotations

import math

import pytest
from helpers import RowEncoder, embedded_tokenizer, family_tokenizer, math_agent_pairs, msg

from mtdpo.preprocess.records import MaskOptions
from mtdpo.preprocess.rows import ROLES, RowError, problem_key, to_pair

Q, A, B = msg("user", "What is 2 + 3?"), msg("assistant", "It is 5."), msg("assistant", "It is 6.")
KNOWN = "system, user, assistant, tool, observation, ipython, function"


def good(**changes) -> dict:
    row = {"chosen": [Q, A], "rejected": [Q, B]}
    row.update(changes)
    return row


BAD_ROWS = {
    "list row": ([Q, A], "row is a list, expected a JSON object"),
    "string row": ("chosen and rejected", "row is a string, expected a JSON object"),
    "null row": (None, "row is null, expected a JSON object"),
    "missing rejected": ({"chosen": [Q, A]}, "missing key 'rejected' (row keys: ['chosen'])"),
    "missing chosen": ({"prompt": "Hi", "rejected": "x"}, "missing key 'chosen' (row keys: ['prompt', 'rejected'])"),
    "unknown role": (good(rejected=[Q, msg("bot", "6")]), f"rejected[1] has unknown role 'bot' (known: {KNOWN})"),
    "null role": (
        good(chosen=[{"role": None, "content": "x"}, A]),
        f"chosen[0] role is null, expected a string (one of: {KNOWN})",
    ),
    "no role": (good(chosen=[{"content": "What?"}, A]), "chosen[0] has no 'role'"),
    "no content": (good(rejected=[Q, {"role": "assistant"}]), "rejected[1] (assistant) has no 'content'"),
    "null content": (
        good(chosen=[Q, {"role": "assistant", "content": None}]),
        "chosen[1] (assistant) content is null, expected a string or a list of text parts (null only with tool_calls)",
    ),
    "int content": (
        good(chosen=[{"role": "user", "content": 5}, A]),
        "chosen[0] (user) content is a number, expected a string or a list of text parts",
    ),
    "float content": (
        good(chosen=[Q, {"role": "assistant", "content": 5.5}]),
        "chosen[1] (assistant) content is a number, expected a string or a list of text parts",
    ),
    "NaN content": (
        good(chosen=[Q, {"role": "assistant", "content": math.nan}]),
        "chosen[1] (assistant) content is NaN, expected a string or a list of text parts",
    ),
    "list content": (
        good(rejected=[Q, {"role": "assistant", "content": ["It", "is"]}]),
        'rejected[1] (assistant) content part 0 is a string, expected {"type": "text", "text": ...}',
    ),
    "message is a string": (
        good(chosen=["What?", A]),
        "chosen[0] is a string, expected an object with 'role' and 'content'",
    ),
    "side is a number": (good(chosen=7), "chosen is a number, expected a list of messages or a string"),
    "prompt is a dict": (good(prompt={"role": "user"}), "prompt is an object, expected a list of messages or a string"),
    "empty side": (good(chosen=[]), "empty conversation: chosen has no messages"),
    "identical": (good(rejected=[Q, A]), "chosen and rejected are identical"),
    "identical TRL": ({"prompt": "Hi", "chosen": "Yo", "rejected": "Yo"}, "chosen and rejected are identical"),
    "no assistant after prompt": (
        good(chosen=[Q, A, B], rejected=[Q, A, msg("user", "Sure?")]),
        "rejected has no assistant message after the shared prompt (2 messages)",
    ),
    "only users": (
        good(chosen=[msg("user", "a")], rejected=[msg("user", "b")]),
        "chosen has no assistant message after the shared prompt (0 messages)",
    ),
}


@pytest.mark.parametrize("row, reason", list(BAD_ROWS.values()), ids=list(BAD_ROWS))
def test_bad_rows_are_row_errors_with_the_reason(row, reason):
    with pytest.raises(RowError) as err:
        to_pair(row)
    assert str(err.value) == reason


def test_every_documented_role_is_accepted():
    for role in ROLES:
        pair = to_pair(good(chosen=[Q, msg(role, "x"), A]))
        assert pair.chosen[1]["role"] == role
    assert set(ROLES) == {"system", "user", "assistant", "tool", "observation", "ipython", "function"}


def test_full_conversations_share_the_longest_common_message_prefix():
    row = math_agent_pairs()["shared_code_and_tool_exchange"]
    pair = to_pair(row)
    assert pair.n_prompt == 3  # question, code, tool output
    assert pair.chosen == row["chosen"] and pair.rejected == row["rejected"]


def test_extra_message_keys_are_kept_and_nulls_dropped():
    """As apply_chat_template does: a template's `is defined` sees no key set to null."""
    tagged = dict(A, name="calculator", tool_calls=None)
    assert to_pair(good(chosen=[Q, tagged])).chosen[1] == dict(A, name="calculator")


def test_string_shorthands():
    pair = to_pair({"prompt": "What is 2 + 3?", "chosen": "It is 5.", "rejected": "It is 6."})
    assert pair.chosen == [Q, A] and pair.rejected == [Q, B] and pair.n_prompt == 1
    pair = to_pair({"prompt": [msg("system", "Be brief."), Q], "chosen": "It is 5.", "rejected": [B]})
    assert pair.chosen == [msg("system", "Be brief."), Q, A] and pair.n_prompt == 2


def test_null_prompt_is_no_prompt():
    """Columnar inputs (parquet, arrow) hold `prompt: None` for rows that have no prompt."""
    assert to_pair(good(prompt=None)) == to_pair(good())


def test_trl_shape_masks_like_full_conversations():
    full = math_agent_pairs()["shared_code_and_tool_exchange"]
    question, *chosen_tail = full["chosen"]
    trl = {"prompt": [question], "chosen": chosen_tail, "rejected": full["rejected"][1:]}
    assert to_pair(trl) == to_pair(full)  # the shared code/tool exchange joins the prompt
    for tok in (embedded_tokenizer(), family_tokenizer("qwen2")):
        encoder = RowEncoder(tok, MaskOptions())
        assert encoder(trl) == encoder(full)


def test_trl_string_shape_masks_like_full_conversations():
    encoder = RowEncoder(embedded_tokenizer(), MaskOptions())
    shorthand = {"prompt": "What is 2 + 3?", "chosen": "It is 5.", "rejected": "It is 6."}
    record, truncated = encoder(shorthand)
    assert (record, truncated) == encoder(good())
    assert sum(label != -100 for label in record["chosen_labels"]) > 0


# Rows that are valid JSON shapes but cannot be rendered into a usable mask.
def test_sides_that_render_the_same_are_rejected():
    """Gemma trims contents: "It is 5." and " It is 5. " are the same tokens."""
    row = good(rejected=[Q, msg("assistant", " It is 5. ")])
    with pytest.raises(RowError, match="^chosen and rejected render to the same tokens$"):
        RowEncoder(embedded_tokenizer(), MaskOptions())(row)


def test_empty_assistant_message_is_rejected():
    row = good(chosen=[Q, msg("assistant", "  ")])
    with pytest.raises(RowError, match=r"^message 1 \(assistant\) is empty: no content, reasoning or tool calls$"):
        RowEncoder(embedded_tokenizer(), MaskOptions())(row)


def test_the_problem_key_is_the_messages_before_the_first_assistant_turn_with_tools_and_template_variables():
    question = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2 + 2?"}]
    first = [*question, {"role": "assistant", "content": "4"}]
    shared_turn = [*question, {"role": "assistant", "content": "Let me compute."}, {"role": "user", "content": "ok"}]
    assert problem_key(first, None, None) == problem_key(shared_turn, None, None) == problem_key(question, None, None)
    reordered = [{"content": m["content"], "role": m["role"]} for m in first]
    assert problem_key(reordered, None, None) == problem_key(first, None, None)  # not the keys' order
    tools = [{"type": "function", "function": {"name": "python"}}]
    others = [
        problem_key([question[0], {"role": "user", "content": "2 + 3?"}], None, None),
        problem_key(first, tools, None),
        problem_key(first, None, {"enable_thinking": False}),
        problem_key(question[1:], None, None),
    ]
    assert len({problem_key(first, None, None), *others}) == 5
