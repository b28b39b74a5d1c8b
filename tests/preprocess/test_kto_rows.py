"""Unpaired rows (KTO): their two shapes, the reasons a row is rejected, one record kind per file,
and `mtdpo pairs --kto` output preprocessed as it is."""

import json

import pytest
from helpers import assert_user_error, invoke, run_preprocess, write_jsonl

from mtdpo.assets import ROLLOUTS
from mtdpo.cache import open_cache
from mtdpo.errors import UsageError
from mtdpo.preprocess.rows import RowError, row_kind, to_unpaired

USER = {"role": "user", "content": "What is 6 * 7?"}
CALL = {"role": "assistant", "content": "```python\nprint(6 * 7)\n```"}
TOOL = {"role": "tool", "content": "```output\n42\n```"}
ANSWER = {"role": "assistant", "content": "\\boxed{42}"}


def test_a_trajectory_s_prompt_is_what_comes_before_its_first_assistant_message():
    system = {"role": "system", "content": "Use Python."}
    row = to_unpaired({"messages": [system, USER, CALL, TOOL, ANSWER], "label": True, "prompt_id": "p", "gt": "42"})
    assert (row.n_prompt, row.desirable, len(row.messages)) == (2, True, 5)
    trl = to_unpaired({"prompt": "What is 6 * 7?", "completion": "\\boxed{42}", "label": False})
    assert trl.messages == [USER, ANSWER] and trl.n_prompt == 1 and trl.desirable is False
    # an explicit prompt is the prompt, assistant turns in it included (untrained, as a pair's shared prompt)
    history = to_unpaired({"prompt": [USER, CALL, TOOL], "completion": [ANSWER], "label": True})
    assert history.n_prompt == 3
    tools = [{"type": "function", "function": {"name": "python", "parameters": {}}}]
    assert to_unpaired({"messages": [USER, ANSWER], "label": True, "tools": tools}).tools == tools


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"messages": [USER, ANSWER]}, "missing key 'label' (row keys: ['messages'])"),
        (
            {"messages": [USER, ANSWER], "label": 1},
            "label is a number, expected true (desirable) or false (undesirable)",
        ),
        ({"messages": [USER, ANSWER], "label": "yes"}, "label is a string, expected true"),
        ({"label": True}, "missing key 'messages' or 'completion' (row keys: ['label'])"),
        ({"messages": [USER], "label": True}, "messages has no assistant message"),
        (
            {"prompt": [USER, ANSWER], "completion": [TOOL], "label": True},
            "completion has no assistant message after the prompt (2 messages)",
        ),
        (
            {"messages": [USER, ANSWER], "completion": "x", "label": True},
            "the row has both 'messages' and 'completion'",
        ),
        (
            {"messages": [USER, {"role": "robot", "content": "x"}], "label": True},
            "messages[1] has unknown role 'robot'",
        ),
        ([USER], "row is a list, expected a JSON object"),
    ],
)
def test_unusable_unpaired_rows_say_why(row, reason):
    with pytest.raises(RowError) as err:
        to_unpaired(row)
    assert str(err.value).startswith(reason)


def test_a_row_s_keys_say_its_kind():
    assert row_kind({"chosen": [], "rejected": []}) == "pair"
    assert row_kind({"prompt": "q", "chosen": "a", "rejected": "b"}) == "pair"
    assert row_kind({"messages": [], "label": True}) == "kto"
    assert row_kind({"prompt": "q", "completion": "a", "label": False}) == "kto"
    assert row_kind({"prompt": "q", "chosen": None, "completion": "a"}) == "kto"  # parquet's nulls are no key
    assert row_kind({"prompt": "q"}) is None and row_kind([1]) is None


def kto_lines():
    return [
        {"messages": [USER, CALL, TOOL, ANSWER], "label": True},
        {"prompt": "What is 6 * 7?", "completion": "It is 43.", "label": False},
    ]


def test_a_file_mixing_pairs_and_unpaired_rows_is_refused_naming_the_first_odd_row(tmp_path):
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    lines = [{"nothing": 1}, *kto_lines(), pair, pair]  # row 0 decides nothing: row 1 makes it a KTO file
    result = invoke("preprocess", write_jsonl(tmp_path / "mixed.jsonl", lines), "--out", tmp_path / "out", "-q")
    assert_user_error(
        result,
        "row 3: a pair (chosen/rejected) in a file of unpaired rows (row 1 is the first of its kind); "
        "a cache holds one kind: put pairs and unpaired rows in separate files",
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(
        UsageError, match=r"^row 1: an unpaired row \(label, messages or completion\) in a file of pairs"
    ):
        run_preprocess(write_jsonl(tmp_path / "mixed2.jsonl", [pair, kto_lines()[0]]), tmp_path / "out2")


def test_unpaired_rows_are_rejected_dropped_and_truncated_as_pairs_are(tmp_path):
    lines = [*kto_lines(), {"messages": [USER], "label": True}, "not an object"]
    stats = run_preprocess(write_jsonl(tmp_path / "rows.jsonl", lines), tmp_path / "out")
    assert (stats["kept"], stats["rejected"], stats["desirable"], stats["undesirable"]) == (2, 2, 1, 1)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [2, 3]
    assert rejects[0]["reason"] == "messages has no assistant message"
    cache = open_cache(tmp_path / "out")
    first = cache.record(0)
    # a limit inside the first trained turn keeps the row (cut), one before it drops the row
    limit = first.prompt_len + 2
    stats = run_preprocess(tmp_path / "rows.jsonl", tmp_path / "cut", options=mask_options(limit))
    assert (
        stats["truncated"] >= 1
        and open_cache(tmp_path / "cut").record(0).sequence.input_ids == (first.sequence.input_ids[:limit])
    )
    with pytest.raises(
        UsageError, match=r"kept 0 of 4 rows \(2 no trained token left after truncation to --max-length 3"
    ):
        run_preprocess(tmp_path / "rows.jsonl", tmp_path / "none", options=mask_options(3))


def mask_options(max_length):
    from mtdpo.preprocess.records import MaskOptions

    return MaskOptions("assistant", max_length)


def test_pairs_kto_output_preprocesses_as_it_is(tmp_path):
    rows = tmp_path / "round1.kto.jsonl"
    summary = invoke("pairs", ROLLOUTS, "--kto", "--out", rows, "--json")
    numbers = json.loads(summary.stdout)
    stats = run_preprocess(rows, tmp_path / "kto", num_proc=2)
    assert stats["rejected"] == 0 and stats["kept"] == numbers["rows_written"]
    assert (stats["desirable"], stats["undesirable"]) == (numbers["desirable"], numbers["undesirable"])
    manifest = json.loads((tmp_path / "kto" / "manifest.json").read_text())
    assert manifest["kind"] == "kto" and manifest["counts"]["desirable"] == numbers["desirable"]
    run_preprocess(rows, tmp_path / "kto1", num_proc=1)
    for name in ("data-00000-of-00001.arrow", "checksums.json"):  # the same bytes for any --num-proc
        assert (tmp_path / "kto" / name).read_bytes() == (tmp_path / "kto1" / name).read_bytes()


def test_a_trajectory_of_several_generation_contexts_is_rejected_with_its_reason(tmp_path):
    """Qwen3 drops an answered turn's <think> block from the history: the first turn is scored in
    its own context, so the trajectory is two sequences, which a KTO row cannot be (yet)."""
    from helpers import family_tokenizer, msg

    tok = family_tokenizer("qwen3")
    tok.save_pretrained(tmp_path / "tokenizer")
    first = {"role": "assistant", "content": "It is 4.", "reasoning_content": "2 and 2 make 4."}
    second = {"role": "assistant", "content": "8.", "reasoning_content": "Double it."}
    several = [msg("user", "What is 2 + 2?"), first, msg("user", "And times two?"), second]
    one = [msg("user", "What is 2 + 2?"), {"role": "assistant", "content": "It is 4."}]
    rows = [{"messages": several, "label": True}, {"messages": one, "label": False}]
    stats = run_preprocess(
        write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "out", tokenizer=str(tmp_path / "tokenizer")
    )
    assert (stats["kept"], stats["rejected"]) == (1, 1)
    reason = json.loads((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()[0])["reason"]
    assert reason.startswith(
        "the trajectory is scored in 2 generation contexts (the chat template is not prefix-stable)"
    )
