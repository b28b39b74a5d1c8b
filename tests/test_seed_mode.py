"""`--mask-mode seed` reproduces the original research rule exactly (DESIGN.md).

The reference below is written from the rule's statement, over token ids only: mask the
shared prompt including the first `<start_of_turn>model\\n`; mask from each
`<start_of_turn>user\\n` token sequence through the next `<end_of_turn>\\n` inclusive; train
everything else, so later `<start_of_turn>model\\n` headers are trained.
"""

from __future__ import annotations

import datasets
import pytest
from conftest import (
    GEMMA_END,
    GEMMA_USER,
    decoded_runs,
    embedded_tokenizer,
    math_agent_pairs,
    n_prompt_messages,
    run_preprocess,
    sample_rows,
    write_jsonl,
)

from mtdpo.errors import UsageError
from mtdpo.preprocess.encode import MaskOptions, PairEncoder
from mtdpo.preprocess.rows import to_pair

IGNORE = -100


def seed_reference(tok, messages: list[dict], n_prompt: int, user: str = GEMMA_USER, end: str = GEMMA_END) -> list[int]:
    """Labels of the original rule, computed on token ids."""
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = tok.apply_chat_template(messages[:n_prompt], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # Gemma headers end in "\n" + content: token-stable
    user_ids = tok(user, add_special_tokens=False)["input_ids"]
    end_ids = tok(end, add_special_tokens=False)["input_ids"]

    labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) :]
    i = 0
    while i < len(ids):
        if ids[i : i + len(user_ids)] != user_ids:
            i += 1
            continue
        j = i + len(user_ids)
        while j < len(ids) and ids[j : j + len(end_ids)] != end_ids:
            j += 1
        j = min(j + len(end_ids), len(ids))  # through the end marker, inclusive
        labels[i:j] = [IGNORE] * (j - i)
        i = j
    return labels


def seed_encoder(user: str = GEMMA_USER, end: str = GEMMA_END) -> PairEncoder:
    return PairEncoder(embedded_tokenizer(), MaskOptions("seed", 4096, user, end))


def test_seed_mode_equals_the_reference_on_the_sample():
    tok, encoder = embedded_tokenizer(), seed_encoder()
    rows = sample_rows()
    for row in rows:
        record, _ = encoder(row)
        pair = to_pair(row)
        for side in ("chosen", "rejected"):
            assert record[f"{side}_labels"] == seed_reference(tok, getattr(pair, side), pair.n_prompt)


def test_seed_mode_trains_later_model_headers():
    """What the original rule trains: assistant text, its <end_of_turn>\\n, and the
    `<start_of_turn>model\\n` header of every assistant turn after the first one."""
    tok = embedded_tokenizer()
    row = math_agent_pairs()["shared_code_and_tool_exchange"]
    record, _ = seed_encoder()(row)
    check, final = row["chosen"][3]["content"], row["chosen"][5]["content"]
    assert decoded_runs(tok, record["chosen_input_ids"], record["chosen_labels"]) == [
        f"{check}<end_of_turn>\n",
        f"<start_of_turn>model\n{final}<end_of_turn>\n",
    ]
    # The assistant mode trains a subset: the same turns without headers and trailing newlines.
    assistant, _ = PairEncoder(tok, MaskOptions())(row)
    assert decoded_runs(tok, assistant["chosen_input_ids"], assistant["chosen_labels"]) == [
        f"{check}<end_of_turn>",
        f"{final}<end_of_turn>",
    ]


def test_seed_mode_is_a_superset_of_assistant_mode_by_headers_only():
    tok, seed, assistant = embedded_tokenizer(), seed_encoder(), PairEncoder(embedded_tokenizer(), MaskOptions())
    extra_tokens = set()
    for row in sample_rows(60):
        a, s = assistant(row)[0], seed(row)[0]
        for side in ("chosen", "rejected"):
            assert a[f"{side}_input_ids"] == s[f"{side}_input_ids"]
            for token, la, ls in zip(a[f"{side}_input_ids"], a[f"{side}_labels"], s[f"{side}_labels"], strict=True):
                assert la == IGNORE or ls == la  # trained by assistant mode ⇒ trained by seed mode
                if la == IGNORE and ls != IGNORE:
                    extra_tokens.add(tok.decode([token]))
    assert extra_tokens == {"<start_of_turn>", "model", "\n"}


def test_seed_markers_can_be_overridden():
    """With `<end_of_turn>` (no newline) as end marker the newline after user turns is trained."""
    tok = embedded_tokenizer()
    encoder = seed_encoder(GEMMA_USER, "<end_of_turn>")
    for row in sample_rows(20):
        pair = to_pair(row)
        record, _ = encoder(row)
        expected = seed_reference(tok, pair.chosen, pair.n_prompt, GEMMA_USER, "<end_of_turn>")
        assert record["chosen_labels"] == expected
        assert expected != seed_reference(tok, pair.chosen, pair.n_prompt) or pair.chosen[-1]["role"] != "tool"


def test_pipeline_seed_mode_resolves_gemma_markers(tmp_path):
    rows = sample_rows(50)
    stats = run_preprocess(write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "seed", options=MaskOptions("seed"))
    assert stats["kept"] == 50
    manifest = (tmp_path / "seed" / "manifest.json").read_text()
    assert '"mask_mode": "seed"' in manifest
    assert '"seed_markers": [\n    "<start_of_turn>user\\n",\n    "<end_of_turn>\\n"\n  ]' in manifest
    tok = embedded_tokenizer()
    for record in datasets.load_from_disk(str(tmp_path / "seed")):
        pair = to_pair(rows[record["row"]])
        assert record["chosen_labels"] == seed_reference(tok, pair.chosen, n_prompt_messages(rows[record["row"]]))
        assert record["rejected_labels"] == seed_reference(tok, pair.rejected, pair.n_prompt)


def test_seed_mode_needs_markers_for_an_unknown_family(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    rows = write_jsonl(tmp_path / "rows.jsonl", sample_rows(2))
    with pytest.raises(UsageError, match="unknown template family; pass --user-marker and --end-marker"):
        run_preprocess(rows, tmp_path / "out", chat_template=template, options=MaskOptions("seed"))
    with pytest.raises(UsageError, match="unknown --mask-mode 'everything'"):
        run_preprocess(rows, tmp_path / "out", options=MaskOptions("everything"))
    assert not (tmp_path / "out").exists()
