"""`--mask-mode seed` reproduces the original research rule exactly (docs/DESIGN.md): the
masks equal `seed_reference` (tests/helpers.py), written independently from the rule's statement."""

from __future__ import annotations

import datasets
import pytest
from helpers import (
    GEMMA_END,
    GEMMA_USER,
    IGNORE,
    RowEncoder,
    decoded_runs,
    embedded_tokenizer,
    math_agent_pairs,
    n_prompt_messages,
    run_preprocess,
    sample_rows,
    seed_reference,
    write_jsonl,
)

from mtdpo.errors import UsageError
from mtdpo.preprocess.records import MaskOptions
from mtdpo.preprocess.rows import to_pair


def seed_encoder(user: str = GEMMA_USER, end: str = GEMMA_END) -> RowEncoder:
    return RowEncoder(embedded_tokenizer(), MaskOptions("seed", 4096, user, end))


def test_seed_mode_equals_the_reference_on_the_sample():
    tok, encoder = embedded_tokenizer(), seed_encoder()
    for row in sample_rows():
        record, _ = encoder(row)
        for side in ("chosen", "rejected"):
            assert record[f"{side}_labels"] == seed_reference(tok, row[side], n_prompt_messages(row))


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
    assistant, _ = RowEncoder(tok, MaskOptions())(row)
    assert decoded_runs(tok, assistant["chosen_input_ids"], assistant["chosen_labels"]) == [
        f"{check}<end_of_turn>",
        f"{final}<end_of_turn>",
    ]


def test_seed_mode_is_a_superset_of_assistant_mode_by_headers_only():
    tok, seed, assistant = embedded_tokenizer(), seed_encoder(), RowEncoder(embedded_tokenizer(), MaskOptions())
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
    """With `<end_of_turn>` (no newline) as end marker, the newline after each user turn is trained."""
    tok = embedded_tokenizer()
    encoder = seed_encoder(GEMMA_USER, "<end_of_turn>")
    (newline,) = tok("\n", add_special_tokens=False)["input_ids"]
    for row in sample_rows(20):
        pair = to_pair(row)
        record, _ = encoder(row)
        ids, labels = record["chosen_input_ids"], record["chosen_labels"]
        assert labels == seed_reference(tok, pair.chosen, pair.n_prompt, GEMMA_USER, "<end_of_turn>")
        changed = [i for i, (a, b) in enumerate(zip(labels, seed_reference(tok, pair.chosen, pair.n_prompt))) if a != b]
        tool_turns = sum(m["role"] == "tool" for m in pair.chosen[pair.n_prompt :])  # rendered as user turns
        assert len(changed) == tool_turns and all(ids[i] == labels[i] == newline for i in changed)


def test_pipeline_seed_mode_resolves_gemma_markers(tmp_path):
    rows = sample_rows(50)
    stats = run_preprocess(write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "seed", options=MaskOptions("seed"))
    assert stats["kept"] == 50
    manifest = (tmp_path / "seed" / "manifest.json").read_text()
    assert '"mask_mode": "seed"' in manifest
    assert '"seed_markers": [\n    "<start_of_turn>user\\n",\n    "<end_of_turn>\\n"\n  ]' in manifest
    tok = embedded_tokenizer()
    for record in datasets.load_from_disk(str(tmp_path / "seed")):
        row = rows[record["row"]]
        for side in ("chosen", "rejected"):
            assert record[f"{side}_labels"] == seed_reference(tok, row[side], n_prompt_messages(row))


def test_seed_mode_needs_markers_for_an_unknown_family(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    rows = write_jsonl(tmp_path / "rows.jsonl", sample_rows(2))
    with pytest.raises(UsageError, match="unknown template family; pass --user-marker and --end-marker"):
        run_preprocess(rows, tmp_path / "out", chat_template=template, options=MaskOptions("seed"))
    with pytest.raises(UsageError, match="unknown --mask-mode 'everything'"):
        run_preprocess(rows, tmp_path / "out", options=MaskOptions("everything"))
    assert not (tmp_path / "out").exists()


def test_seed_mode_finds_markers_that_merge_into_tokens():
    """Mistral: the space before " [INST]" merges with "[" into one token; markers are
    matched in the text, so the user (tool-output) turns are still masked."""
    from helpers import family_tokenizer, for_family

    from mtdpo.families import detect_family

    tok = family_tokenizer("mistral")
    row = for_family(math_agent_pairs()["shared_code_and_tool_exchange"], "mistral")
    record, _ = RowEncoder(tok, MaskOptions("seed", 4096, *detect_family(tok.chat_template).seed_markers))(row)
    runs = decoded_runs(tok, record["chosen_input_ids"], record["chosen_labels"])
    assert runs and all(run.endswith("</s>") for run in runs)  # the " [" token of " [INST]" is masked too
    trained = "".join(runs)
    user_turns = [m["content"] for m in to_pair(row).chosen[n_prompt_messages(row) :] if m["role"] == "user"]
    assert user_turns and all(content not in trained for content in user_turns)
    assert "[INST" not in trained and "/INST]" not in trained


def test_one_family_registry_gives_each_template_its_turns_and_seed_markers():
    """Every shipped family template is recognised as one family, the one show-sample reads its
    turns with and the one whose seed markers preprocess uses (they used to be two tables)."""
    from helpers import family_tokenizer

    from mtdpo.families import detect_family

    expected = {"gemma": "gemma", "llama3": "llama3", "qwen2": "chatml", "mistral": "mistral", "phi3": "phi3"}
    for name, family in expected.items():
        found = detect_family(family_tokenizer(name).chat_template)
        assert found is not None and found.name == family, name
        user, end = found.seed_markers
        assert user in family_tokenizer(name).apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert detect_family(family_tokenizer("phi3").chat_template).seed_markers == ("<|user|>\n", "<|end|>\n")
