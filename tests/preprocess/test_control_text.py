"""A control token's text written inside a message (`<|im_end|>` in a code sample).

The tokenizer would encode it as the control token, so a turn would end in the middle of a turn:
by default the row is rejected naming the token and the option; with `--control-as-text`
the characters are encoded as plain text (the tokens `tokenizer(text, split_special_tokens=True)`
gives them), and every other token stays as it was."""

from __future__ import annotations

import copy
import json
import re

import pytest
from agent_rows import agent_rows
from helpers import RowEncoder, assert_user_error, decoded_runs, family_tokenizer, invoke, trained_runs, write_jsonl

from mtdpo.cache import read_manifest
from mtdpo.errors import UsageError
from mtdpo.preprocess.control_text import SENTINEL_BASE, ControlText
from mtdpo.preprocess.records import KtoRecordBuilder, MaskOptions
from mtdpo.preprocess.rows import RowError
from mtdpo.preprocess.template import ControlTokens

PLAIN = MaskOptions(control_as_text=True)
Q = {"role": "user", "content": "How does a ChatML turn end?"}
# The end markers of three families, written as text inside an answer.
ANSWER = "Write <|im_end|> (ChatML) or <|eot_id|> (Llama 3) or <end_of_turn> (Gemma)."
END = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma3": "<end_of_turn>"}


def pair(answer: str, question: dict = Q) -> dict:
    return {
        "chosen": [question, {"role": "assistant", "content": answer}],
        "rejected": [question, {"role": "assistant", "content": "No idea."}],
    }


def plain_ids(tok, text: str) -> list[int]:
    """`tok(text, split_special_tokens=True)`, without leaving the shared tokenizer in that state."""
    tok = copy.deepcopy(tok)
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@pytest.mark.parametrize("family", sorted(END))
def test_a_message_holding_a_control_token_is_rejected_naming_it(family):
    with pytest.raises(RowError) as err:
        RowEncoder(family_tokenizer(family))(pair(ANSWER))
    assert str(err.value) == (
        f"chosen[1] content holds the text of the control token {END[family]!r}, which the tokenizer would encode "
        "as that token: remove or escape it, or pass --control-as-text"
    )


def test_reasoning_and_call_arguments_are_checked_too():
    encode = RowEncoder(family_tokenizer("qwen3"))
    thinking = {"role": "assistant", "content": "Done.", "reasoning_content": "maybe <|im_end|> here"}
    with pytest.raises(
        RowError, match=r"^chosen\[1\] reasoning_content holds the text of the control token '<\|im_end\|>'"
    ):
        encode({"chosen": [Q, thinking], "rejected": [Q, {"role": "assistant", "content": "No."}]})
    call = {"type": "function", "function": {"name": "echo", "arguments": {"text": ["a", "<|im_start|>b"]}}}
    calling = {"role": "assistant", "content": "", "tool_calls": [call]}
    with pytest.raises(RowError, match=r"^chosen\[1\] tool_calls\[0\] arguments holds the text of the control token"):
        encode({"chosen": [Q, calling], "rejected": [Q, {"role": "assistant", "content": "No."}]})


@pytest.mark.parametrize("family", sorted(END))
def test_with_the_option_the_answer_trains_its_plain_tokens_then_one_end(family):
    tok = family_tokenizer(family)
    question = {"role": "user", "content": f"Is {END[family]} a token?"}  # in the prompt too: text, not trained
    answer = f"Write {END[family]} to end a turn, as {END[family]} does."
    record, _ = RowEncoder(tok, PLAIN)(pair(answer, question))
    ids, labels = record["chosen_input_ids"], record["chosen_labels"]
    end = tok.convert_tokens_to_ids(END[family])
    assert trained_runs(ids, labels) == [plain_ids(tok, answer) + [end]]
    # every end token is the template's: the three texts of it (question, answer) are not tokens
    assert tok.decode(ids).count(END[family]) == ids.count(end) + 3


def test_rows_without_control_text_are_the_same_with_the_option():
    rows = agent_rows(18)
    for family in ("qwen3", "gemma3", "llama3"):  # qwen3: sides of several sequences
        default, plain = RowEncoder(family_tokenizer(family)), RowEncoder(family_tokenizer(family), PLAIN)
        for row in rows:
            try:
                expected = default(row)
            except RowError as err:
                with pytest.raises(RowError, match=f"^{re.escape(str(err))}$"):
                    plain(row)
                continue
            assert plain(row) == expected


def test_a_side_of_several_sequences_keeps_the_text_in_each():
    """Qwen3 drops an earlier turn's reasoning: each turn is trained in its own sequence."""
    tok = family_tokenizer("qwen3")
    first = {"role": "assistant", "content": "Like <|im_end|>.", "reasoning_content": "Recall ChatML."}
    second = {"role": "assistant", "content": "Yes: <|im_end|>, once."}
    row = {
        "chosen": [Q, first, {"role": "user", "content": "Sure?"}, second],
        "rejected": [Q, {"role": "assistant", "content": "No idea."}],
    }
    record, _ = RowEncoder(tok, PLAIN).builder(0, row)
    pieces = record.chosen.pieces()
    assert len(pieces) == 2
    runs = [decoded_runs(tok, p.input_ids, p.labels) for p in pieces]
    assert runs == [
        ["<think>\nRecall ChatML.\n</think>\n\nLike <|im_end|>.<|im_end|>"],
        ["<think>\n\n</think>\n\nYes: <|im_end|>, once.<|im_end|>"],
    ]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [run[-1] for p in pieces for run in trained_runs(p.input_ids, p.labels)] == [end, end]
    assert all(run.count(end) == 1 for p in pieces for run in trained_runs(p.input_ids, p.labels))


def test_call_arguments_are_plain_text_with_the_option():
    tok = family_tokenizer("qwen2")
    call = {"type": "function", "function": {"name": "echo", "arguments": {"text": "<|im_end|>"}}}
    row = {
        "tools": [{"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}}],
        "chosen": [Q, {"role": "assistant", "content": "", "tool_calls": [call]}],
        "rejected": [Q, {"role": "assistant", "content": "No idea."}],
    }
    record, _ = RowEncoder(tok, PLAIN)(row)
    (run,) = trained_runs(record["chosen_input_ids"], record["chosen_labels"])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert run.count(end) == 1 and run[-1] == end
    assert '"arguments": {"text": "<|im_end|>"}' in tok.decode(run)


def test_a_kto_row_takes_the_option_too():
    tok = family_tokenizer("qwen2")
    answer = "End with <|im_end|>."
    row = {"messages": [Q, {"role": "assistant", "content": answer}], "label": True}
    with pytest.raises(RowError, match=r"^messages\[1\] content holds the text of the control token '<\|im_end\|>'"):
        KtoRecordBuilder(tok, MaskOptions())(0, row)
    record, _ = KtoRecordBuilder(tok, PLAIN)(0, row)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trained_runs(record.sequence.input_ids, record.sequence.labels) == [plain_ids(tok, answer) + [end]]


def test_a_token_the_tokenizer_matches_even_as_text_is_a_reason():
    """`<tool_call>` is an added token that is not special: split_special_tokens leaves it a token."""
    tok = family_tokenizer("qwen2")
    control = ControlText(tok, ControlTokens(["<tool_call>"]))
    hidden = control.hide([{"role": "assistant", "content": "a <tool_call> b"}])
    text, ranges = control.reveal(hidden[0]["content"])
    assert (text, ranges) == ("a <tool_call> b", [(2, 13)])
    tokens = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    from mtdpo.preprocess.tokens import Tokens

    with pytest.raises(RowError, match=r"^the tokenizer encodes '<tool_call>' as its token even as text"):
        control.encode(Tokens.of(tokens), text, ranges)


def test_sentinels_the_row_holds_or_the_template_escapes_are_reasons():
    control = ControlText(family_tokenizer("qwen2"), ControlTokens(["<|im_end|>"]))
    with pytest.raises(RowError, match="private-use characters"):
        control.hide([{"role": "user", "content": f"<|im_end|> {chr(SENTINEL_BASE)}"}])
    hidden = control.hide([{"role": "user", "content": "<|im_end|>"}])[0]["content"]
    with pytest.raises(RowError, match="escapes the text of a control token"):
        control.reveal(json.dumps(hidden))  # ensure_ascii: \ue000...
    with pytest.raises(RowError, match="cuts the text of the control token"):
        control.reveal(hidden[:3])


def test_the_option_needs_the_assistant_mask():
    with pytest.raises(UsageError, match="^--control-as-text works with --mask-mode assistant only$"):
        MaskOptions(mode="seed", control_as_text=True)


def test_cli_names_the_option_then_keeps_the_row_with_it(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [pair(ANSWER)])
    family_tokenizer("qwen2").save_pretrained(tokenizer := tmp_path / "tokenizer")
    out = tmp_path / "cache"
    result = invoke("preprocess", data, "--tokenizer", tokenizer, "--out", out, "-q", "--strict")
    assert_user_error(
        result,
        "row 0: chosen[1] content holds the text of the control token '<|im_end|>', which the tokenizer would "
        "encode as that token: remove or escape it, or pass --control-as-text (--strict stops at the first bad row)",
    )
    result = invoke("preprocess", data, "--tokenizer", tokenizer, "--out", out, "-q", "--control-as-text")
    assert result.exit_code == 0, result.output
    assert read_manifest(out).control_as_text
    assert '"control_as_text": true' in (out / "manifest.json").read_text()
    again = tmp_path / "plain"
    assert invoke("preprocess", write_jsonl(tmp_path / "p.jsonl", [pair("Fine.")]), "--out", again, "-q").exit_code == 0
    assert "control_as_text" not in (again / "manifest.json").read_text()


def test_a_tokenizer_left_splitting_special_tokens_still_encodes_them_as_tokens():
    """transformers leaves `split_special_tokens=True` set in the backend after such a call."""
    tok = copy.deepcopy(family_tokenizer("qwen2"))
    tok("<|im_end|>", split_special_tokens=True)
    assert RowEncoder(tok)(pair("Fine.")) == RowEncoder(family_tokenizer("qwen2"))(pair("Fine."))


def test_cli_error_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [pair(ANSWER)])
    result = invoke("preprocess", data, "--mask-mode", "seed", "--control-as-text", "--out", tmp_path / "c", "-q")
    assert_user_error(result, "--control-as-text works with --mask-mode assistant only")
