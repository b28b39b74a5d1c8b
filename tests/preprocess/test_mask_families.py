"""The masking rule on five real chat-template families (docs/DESIGN.md, "The masking rule").

A token is trained iff an assistant message after the shared prompt emitted it: its content
and its end-of-turn marker. Each family's tokenizer is the embedded byte-level BPE plus the
family's special tokens and its real template (tests/templates/). Templates that rewrite
earlier turns must give a RowError, never a silent mask.
"""

from __future__ import annotations

import pytest
from helpers import (
    FAMILIES,
    IGNORE,
    TEMPLATES,
    RowEncoder,
    decoded_runs,
    family_tokenizer,
    for_family,
    math_agent_pairs,
    msg,
    n_prompt_messages,
    sample_rows,
    with_template,
)

from mtdpo.preprocess.records import MaskOptions
from mtdpo.preprocess.rows import RowError

FAMILY_NAMES = ["gemma", "llama3", "qwen2", "mistral", "phi3"]
# Mistral's template writes ' ' + content after [/INST] and has no generation prompt, so
# the model generates that space: it belongs to the trained text.
LEAD = {"mistral": " "}


def encode(tok, row: dict) -> dict:
    record, truncated = RowEncoder(tok, MaskOptions())(row)
    assert not truncated
    return record


def expected_trained(family: str, messages: list[dict], n_prompt: int) -> list[str]:
    eot = FAMILIES[family]["end_of_turn"]
    return [LEAD.get(family, "") + m["content"] + eot for m in messages[n_prompt:] if m["role"] == "assistant"]


def assert_mask_rule(family: str, row: dict) -> None:
    """Every property of the rule, on both sides of one pair."""
    tok = family_tokenizer(family)
    record = encode(tok, row)
    n_prompt = n_prompt_messages(row)
    prompt_text = tok.apply_chat_template(row["chosen"][:n_prompt], tokenize=False, add_generation_prompt=True)
    renders_bos = "bos_token" in tok.chat_template
    for side in ("chosen", "rejected"):
        messages = row[side]
        ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
        # The ids are the template's text tokenized once, with no special token added on top.
        text = tok.apply_chat_template(messages, tokenize=False)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert record[f"{side}_len"] == len(ids) == len(labels)

        # Exactly the post-prompt assistant contents, each with its end-of-turn marker, in order.
        runs = decoded_runs(tok, ids, labels)
        assert runs == expected_trained(family, messages, n_prompt)

        # No system, user or tool text (nor a shared-prompt assistant turn) is trained.
        trained_text = "".join(runs)
        for m in messages[:n_prompt] + [m for m in messages[n_prompt:] if m["role"] != "assistant"]:
            assert m["content"] not in trained_text

        # The shared prompt, up to and including the generation header, is fully masked:
        # everything before the first trained token is exactly that text.
        first = next(i for i, label in enumerate(labels) if label != IGNORE)
        assert tok.decode(ids[:first]) == prompt_text
        assert record["prompt_len"] >= first

        # BOS: exactly once, first, masked, where the template renders it; never added on top.
        if renders_bos:
            assert ids.count(tok.bos_token_id) == 1
            assert ids[0] == tok.bos_token_id and labels[0] == IGNORE
        else:
            assert tok.bos_token_id not in ids


@pytest.mark.parametrize("case", list(math_agent_pairs()))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_only_post_prompt_assistant_turns_are_trained(family, case):
    assert_mask_rule(family, for_family(math_agent_pairs()[case], family))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_mask_rule_on_sample_rows(family):
    """Generated rows: system or not, 1–4 assistant turns, tracebacks, unicode."""
    for row in sample_rows(12):
        assert_mask_rule(family, for_family(row, family))


def test_family_tool_roles_are_rendered_as_such():
    """The data really exercises each family's tool turn (not a silently dropped message)."""
    row = math_agent_pairs()["shared_code_and_tool_exchange"]
    headers = {
        "llama3": '<|start_header_id|>ipython<|end_header_id|>\n\n"```output\\n8\\n```"<|eot_id|>',  # JSON-encoded
        "qwen2": "<|im_start|>user\n<tool_response>\n```output\n8\n```\n</tool_response><|im_end|>",
        "gemma": "<start_of_turn>user\n```output\n8\n```<end_of_turn>",
        "mistral": " [INST] ```output\n8\n``` [/INST]",
        "phi3": "<|user|>\n```output\n8\n```<|end|>",
    }
    for family, rendered in headers.items():
        tok = family_tokenizer(family)
        assert rendered in tok.apply_chat_template(for_family(row, family)["chosen"], tokenize=False)


def test_mistral_trains_the_space_after_inst():
    tok = family_tokenizer("mistral")
    row = for_family(math_agent_pairs()["diverge_at_last_assistant"], "mistral")
    record = encode(tok, row)
    assert decoded_runs(tok, record["rejected_input_ids"], record["rejected_labels"]) == [
        " The output is 16.\n\nThe answer is $\\boxed{16}$.</s>"
    ]


def test_phi3_closing_endoftext_is_masked():
    """Phi-3 appends <|endoftext|> to every render: it closes the text but is not trained."""
    tok = family_tokenizer("phi3")
    record = encode(tok, for_family(math_agent_pairs()["diverge_at_first_assistant"], "phi3"))
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    for side in ("chosen", "rejected"):
        ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
        assert ids.count(endoftext) == 1 and ids[-1] == endoftext and labels[-1] == IGNORE
        assert labels[-3] == tok.convert_tokens_to_ids("<|end|>")  # ..., <|end|>, \n, <|endoftext|>


def test_common_token_prefix_past_the_prompt_stays_trained():
    """prompt_len counts tokens shared by both sides, which may be trained assistant text."""
    tok = family_tokenizer("qwen2")
    record = encode(tok, math_agent_pairs()["same_words_after_divergence"])
    shared = tok("The output is", add_special_tokens=False)["input_ids"]
    for side in ("chosen", "rejected"):
        ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
        first = next(i for i, label in enumerate(labels) if label != IGNORE)
        assert tok.decode(ids[:first]).endswith(
            "```output\n8\n```\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        )
        assert ids[first : first + len(shared)] == labels[first : first + len(shared)] == shared
    assert record["prompt_len"] >= first + len(shared)


@pytest.mark.parametrize("family", ["gemma", "llama3"])
def test_trimmed_whitespace_is_not_trained(family):
    """Gemma and Llama-3 trim contents; the trained text is what the template emitted."""
    row = {
        "chosen": [msg("user", "What is 2 + 3?"), msg("assistant", "  \nIt is $\\boxed{5}$.\n\n  ")],
        "rejected": [msg("user", "What is 2 + 3?"), msg("assistant", " It is $\\boxed{6}$. ")],
    }
    tok = family_tokenizer(family)
    record = encode(tok, row)
    eot = FAMILIES[family]["end_of_turn"]
    assert decoded_runs(tok, record["chosen_input_ids"], record["chosen_labels"]) == [f"It is $\\boxed{{5}}$.{eot}"]
    assert decoded_runs(tok, record["rejected_input_ids"], record["rejected_labels"]) == [f"It is $\\boxed{{6}}$.{eot}"]


# ── templates that are not prefix-stable or alter the text: RowError, never a silent mask ──

# Qwen3-style: reasoning of assistant turns before the last user query is dropped.
QWEN3_LIKE = """
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
    {%- set content = m.content -%}
    {%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content -%}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
    {%- endif -%}
    {{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""

# Some Mistral templates put the system prompt into the last user turn.
SYSTEM_IN_LAST_USER = """
{%- set ns = namespace(last_user=-1, system='') -%}
{%- for m in messages -%}
    {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
    {%- if m.role == 'system' -%}{%- set ns.system = m.content + '\\n\\n' -%}{%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{%- for m in messages -%}
    {%- if m.role == 'user' -%}
        {{- '[INST] ' + (ns.system if loop.index0 == ns.last_user else '') + m.content + ' [/INST]' -}}
    {%- elif m.role == 'assistant' -%}
        {{- ' ' + m.content + eos_token -}}
    {%- endif -%}
{%- endfor -%}
"""

# Renders assistant text differently from the message (here: shortens the code fence).
ALTERING = """
{%- for m in messages -%}
    {%- set content = m.content | replace('```python', '```py') if m.role == 'assistant' else m.content -%}
    {{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""


def thinking_pair(follow_up: bool) -> dict:
    q = msg("user", "What is 6 × 7?")
    chosen = [
        q,
        msg("assistant", "<think>Multiply.</think>\n```python\nprint(6 * 7)\n```"),
        msg("tool", "```output\n42\n```"),
        msg("assistant", "<think>The tool says 42.</think>\nThe answer is $\\boxed{42}$."),
    ]
    rejected = [q, msg("assistant", "<think>Add them.</think>\nThe answer is $\\boxed{13}$.")]
    if follow_up:  # a second user question after the first answers
        chosen += [msg("user", "And 6 × 8?"), msg("assistant", "<think>42 + 6.</think>\n$\\boxed{48}$")]
        rejected += [msg("user", "And 6 × 8?"), msg("assistant", "<think>13 + 1.</think>\n$\\boxed{14}$")]
    return {"chosen": chosen, "rejected": rejected}


def test_think_template_is_fine_while_nothing_is_dropped():
    """Control: with tool turns only, Qwen3-style keeps every <think> and is prefix-stable."""
    tok = with_template("qwen2", QWEN3_LIKE)
    row = thinking_pair(follow_up=False)
    record = encode(tok, row)
    assert decoded_runs(tok, record["chosen_input_ids"], record["chosen_labels"]) == [
        m["content"] + "<|im_end|>" for m in row["chosen"][1:] if m["role"] == "assistant"
    ]


def test_a_turn_whose_think_block_the_history_drops_is_scored_in_its_own_context():
    """The template drops an answered turn's <think> block once a later user turn follows. The
    model generated the first two turns with their think blocks (nothing followed them then), so
    they are trained in the context they had: one sequence; the last turn, after the history
    without them, in a second sequence. No turn is trained twice."""
    tok = with_template("qwen2", QWEN3_LIKE)
    row = thinking_pair(follow_up=True)
    chosen = row["chosen"]
    assert "<think>Multiply." not in tok.apply_chat_template(chosen, tokenize=False)  # it does drop it
    (first_text, first_runs), (second_text, second_runs) = RowEncoder(tok).sequences(row)
    assert first_text == tok.apply_chat_template(chosen[:4], tokenize=False).removesuffix("\n")
    assert first_runs == [chosen[1]["content"] + "<|im_end|>", chosen[3]["content"] + "<|im_end|>"]
    assert second_text == tok.apply_chat_template(chosen, tokenize=False)  # the whole render: the history as dropped
    assert second_runs == [chosen[5]["content"] + "<|im_end|>"]


def test_raw_output_after_a_think_opener_is_trained_after_it():
    """QwQ's generation prompt ends `<think>\\n`, which the template does not render before an
    assistant message. A message holding the model's raw output after it (`R\\n</think>\\n\\nA`,
    a server without a reasoning parser) is trained right after the opener, each turn in its own
    context (history drops the block); one without `</think>` lost what the model thought."""
    tok = family_tokenizer("qwq")
    q = msg("user", "Is Paris a capital?")
    chosen = [q, msg("assistant", "Recall.\n</think>\n\nYes."), msg("user", "Sure?"),
              msg("assistant", "Check again.\n</think>\n\nYes, sure.")]  # fmt: skip
    row = {"chosen": chosen, "rejected": [q, msg("assistant", "Hmm.\n</think>\n\nNo.")]}
    (first, first_runs), (second, second_runs) = RowEncoder(tok).sequences(row)
    assert first == tok.apply_chat_template(chosen[:1], tokenize=False, add_generation_prompt=True) + first_runs[0]
    assert first_runs == ["Recall.\n</think>\n\nYes.<|im_end|>"]
    assert second.startswith(tok.apply_chat_template(chosen[:3], tokenize=False, add_generation_prompt=True))
    assert second_runs == ["Check again.\n</think>\n\nYes, sure.<|im_end|>"]
    lost = {"chosen": [q, msg("assistant", "Yes.")], "rejected": row["rejected"]}
    with pytest.raises(RowError, match=r"^message 1 \(assistant\): its generation prompt ends with '<\|im_start"):
        RowEncoder(tok)(lost)


def test_qwen25_consecutive_tool_messages_are_merged_and_masked():
    """Qwen2.5 merges consecutive tool messages into one user turn, so a render that ends
    with the first of them is not a prefix of the conversation. The rule never needs that
    render (spans come from the renders before and after each assistant message): the row
    is kept, both tool outputs are masked and the assistant turns are trained as rendered."""
    row = math_agent_pairs()["diverge_at_first_assistant"]
    chosen = list(row["chosen"])
    chosen.insert(4, msg("tool", "```output\nwarning: float\n```"))
    tok = family_tokenizer("qwen2")
    record = encode(tok, {"chosen": chosen, "rejected": row["rejected"]})
    text = tok.apply_chat_template(chosen, tokenize=False)
    assert "</tool_response>\n<tool_response>\n```output\nwarning" in text  # one merged user turn
    runs = decoded_runs(tok, record["chosen_input_ids"], record["chosen_labels"])
    assert runs == [m["content"] + "<|im_end|>" for m in chosen[2:] if m["role"] == "assistant"]


def test_a_system_prompt_moved_into_the_last_user_turn_gives_each_turn_its_context():
    """Each assistant turn was generated with the system prompt in the user turn just before it:
    every turn is a sequence of its own, trained once, after exactly that context."""
    tok = with_template("mistral", SYSTEM_IN_LAST_USER)
    row = for_family(math_agent_pairs()["diverge_at_first_assistant"], "mistral")
    chosen = row["chosen"]
    sequences = RowEncoder(tok).sequences(row)
    turns = [i for i, m in enumerate(chosen) if m["role"] == "assistant"]
    assert len(sequences) == len(turns) > 1
    system = chosen[0]["content"]
    for (text, runs), i in zip(sequences, turns):
        context = tok.apply_chat_template(chosen[:i], tokenize=False, add_generation_prompt=True)
        assert text == context + " " + chosen[i]["content"] + "</s>"
        assert runs == [" " + chosen[i]["content"] + "</s>"] and text.count(system) == 1


def test_template_altering_assistant_text_is_rejected():
    tok = with_template("qwen2", ALTERING)
    with pytest.raises(
        RowError,
        match=r"^message 3 \(assistant\): its text is not in the rendered turn \(the template drops or alters it\)$",
    ):
        RowEncoder(tok, MaskOptions())(math_agent_pairs()["shared_code_and_tool_exchange"])


def test_template_error_is_a_row_error():
    """Gemma's real template has no system role and raises: the reason says so."""
    row = math_agent_pairs()["diverge_at_first_assistant"]  # starts with a system message
    with pytest.raises(RowError, match="^chat template error: System role not supported$"):
        RowEncoder(family_tokenizer("gemma"), MaskOptions())(row)


def test_an_end_of_turn_marker_that_is_no_token_of_the_tokenizer_is_named():
    """Qwen's template with a tokenizer that lacks `<|im_end|>`: the reason used to be "the template
    closes it with no end-of-turn token (it ends '4<|im_end|>')", as if the template were at fault."""
    tok = with_template("gemma", (TEMPLATES / "qwen2.jinja").read_text())
    assert "<|im_end|>" not in tok.get_vocab()
    with pytest.raises(RowError) as err:
        RowEncoder(tok, MaskOptions())(math_agent_pairs()["diverge_at_last_assistant"])
    assert str(err.value) == (
        "message 6 (assistant): the template ends the turn with '<|im_end|>', which is not one token in this "
        "tokenizer (not an added token); use the tokenizer the template was written for"
    )


@pytest.mark.parametrize("family", ["gemma", "llama3", "qwen2", "mistral", "phi3"])
def test_fast_renderer_equals_apply_chat_template(family):
    """ChatTemplate.render skips apply_chat_template's per-call overhead, not its output."""
    from mtdpo.preprocess.template import ChatTemplate

    tok = family_tokenizer(family)
    chat = ChatTemplate(tok)
    for row in math_agent_pairs().values():
        messages = for_family(row, family)["chosen"]
        for n in range(1, len(messages) + 1):
            for prompt in (False, True):
                assert chat.render(messages[:n], prompt) == tok.apply_chat_template(
                    messages[:n], tokenize=False, add_generation_prompt=prompt
                )
