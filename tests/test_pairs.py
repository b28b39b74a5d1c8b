"""`mtdpo pairs` (mtdpo.pairs): the selection rules and the research filters on hand-worked
problems, de-duplication, seeded reproducibility and independence from row, problem and file
order, bad input and rejects, the command line, and output that `mtdpo preprocess` accepts."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import assert_user_error, invoke, write_jsonl

from mtdpo import pairs
from mtdpo.errors import UsageError
from mtdpo.pairs import PairOptions, filter_reason, make_pairs_file, pairs_all, pairs_max_min, pairs_random

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "mtdpo" / "assets" / "rollouts.jsonl"
NO_FILTERS = PairOptions(min_messages=0, end_with_assistant=False, require_code=False, drop_tool_errors=False)


def rng(seed: int = 0) -> random.Random:
    return random.Random(seed)


def solved(answer: str, output: str | None = None) -> list[dict]:
    """question, code, its output, boxed answer: a trajectory every research filter keeps."""
    return [
        {"role": "user", "content": "What is 6 x 7?"},
        {"role": "assistant", "content": f"Compute it.\n```python\nprint({answer})\n```"},
        {"role": "tool", "content": f"```output\n{output or answer}\n```"},
        {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."},
    ]


def row(prompt_id, reward, answer: str = "42", **extra) -> dict:
    return {"prompt_id": prompt_id, "messages": solved(answer), "reward": reward, **extra}


def run(
    tmp_path: Path, rows: list, options: PairOptions = PairOptions(), name: str = "rollouts.jsonl", **kwargs
) -> tuple[dict, list[dict]]:
    source = rows if isinstance(rows, Path) else write_jsonl(tmp_path / name, rows)
    out = tmp_path / "pairs.jsonl"
    numbers = make_pairs_file(source, out, options, overwrite=True, **kwargs)
    return numbers, [json.loads(line) for line in out.read_text().splitlines()]


def rejects(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "pairs.rejects.jsonl").read_text().splitlines()]


def accounted(numbers: dict) -> None:
    """Nothing lost: every row is rejected, filtered, a duplicate or kept."""
    assert numbers["rows"] == numbers["rejected"] + numbers["trajectories"]
    assert numbers["trajectories"] == numbers["filtered"] + numbers["duplicates"] + numbers["kept"]
    assert numbers["used"] <= numbers["kept"]


# ── the rules, on rewards ─────────────────────────────────────────────────────


def test_random_pairs_one_correct_with_one_incorrect_uniformly():
    seen = {tuple(pairs_random([1.0, 0.0, 1.0, 0.0], 0.5, 0.0, rng(seed))[0]) for seed in range(200)}
    assert seen == {(0, 1), (0, 3), (2, 1), (2, 3)}


def test_random_threshold_is_strict_and_all_same_gives_no_pair():
    assert pairs_random([0.6, 0.5], 0.5, 0.0, rng()) == [(0, 1)]  # 0.5 is not above 0.5: incorrect
    assert pairs_random([1.0, 1.0, 1.0], 0.5, 0.0, rng()) == []
    assert pairs_random([0.0, 0.2], 0.5, 0.0, rng()) == []
    assert pairs_random([1.0], 0.5, 0.0, rng()) == []


def test_random_with_min_margin_only_draws_pairs_that_meet_it():
    # correct: 0.9 and 0.55, incorrect: 0.4; 0.55 - 0.4 = 0.15 < 0.4
    assert {tuple(pairs_random([0.9, 0.55, 0.4], 0.5, 0.4, rng(s))[0]) for s in range(50)} == {(0, 2)}
    assert pairs_random([0.55, 0.4], 0.5, 0.4, rng()) == []


def test_max_min_breaks_ties_at_random():
    rewards = [0.2, 0.9, 0.9, 0.1, 0.5]
    assert {tuple(pairs_max_min(rewards, 0.0, rng(s))[0]) for s in range(100)} == {(1, 3), (2, 3)}
    assert {tuple(pairs_max_min([1.0, 0.0, 0.0], 0.0, rng(s))[0]) for s in range(100)} == {(0, 1), (0, 2)}


def test_max_min_needs_different_rewards_and_the_margin():
    assert pairs_max_min([0.7, 0.7], 0.0, rng()) == []
    assert pairs_max_min([0.3, 0.1], 0.2, rng()) == [(0, 1)]  # 0.3 - 0.1 is 0.19999999999999998: still 0.2
    assert pairs_max_min([0.3, 0.1], 0.25, rng()) == []


def test_all_pairs_every_better_with_every_worse_ties_never():
    assert pairs_all([1.0, 0.0, 0.5], 0.0, None, rng()) == [(0, 1), (0, 2), (2, 1)]
    assert pairs_all([1.0, 1.0, 0.0], 0.0, None, rng()) == [(0, 2), (1, 2)]
    assert pairs_all([1.0, 0.0, 0.5], 0.6, None, rng()) == [(0, 1)]
    assert pairs_all([0.5, 0.5], 0.0, None, rng()) == []


def test_all_pairs_cap_draws_under_the_seed_and_keeps_their_order():
    rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # 9 pairs
    capped = pairs_all(rewards, 0.0, 4, rng(3))
    assert len(capped) == 4 and capped == sorted(capped) and set(capped) <= set(pairs_all(rewards, 0.0, None, rng()))
    assert capped == pairs_all(rewards, 0.0, 4, rng(3))
    assert len({tuple(pairs_all(rewards, 0.0, 4, rng(s))) for s in range(20)}) > 1
    assert pairs_all(rewards, 0.0, 9, rng()) == pairs_all(rewards, 0.0, None, rng())


# ── the research filters ──────────────────────────────────────────────────────


def test_min_messages_counts_no_system_message():
    system = [{"role": "system", "content": "Be brief."}]
    direct = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\boxed{1}"}]
    assert filter_reason(system + direct, PairOptions()) == "--min-messages"
    assert filter_reason(system + solved("1"), PairOptions()) is None
    assert filter_reason(direct, PairOptions(min_messages=2)) is None


def test_end_with_assistant_drops_a_trajectory_cut_off_after_a_tool_output():
    cut = solved("1")[:-1] + [
        {"role": "assistant", "content": "```python\nprint(2)\n```"},
        {"role": "tool", "content": "2"},
    ]
    assert filter_reason(cut, PairOptions()) == "--end-with-assistant"
    assert filter_reason(cut, PairOptions(end_with_assistant=False)) is None


def test_two_tool_calls_in_one_turn_pass_every_filter():
    """The research's even message count would drop this: one turn, two calls, two outputs."""
    call = {"type": "function", "function": {"name": "python", "arguments": {"code": "print(1)"}}}
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call, call]},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": "1"},
        {"role": "assistant", "content": "\\boxed{1}"},
    ]
    assert filter_reason(messages, PairOptions()) is None


def test_require_code_in_every_assistant_turn_but_the_last():
    chat = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Let me think."},
        {"role": "user", "content": "go on"},
        {"role": "assistant", "content": "\\boxed{1}"},
    ]
    assert filter_reason(chat, PairOptions()) == "--require-code"
    assert filter_reason(chat, PairOptions(require_code=False)) is None
    parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in solved("1")]
    assert filter_reason(parts, PairOptions()) is None  # ```python inside text parts counts


def test_drop_tool_errors_looks_at_the_last_tool_output_only():
    failed = solved("7", output="Traceback (most recent call last):\nNameError: name 'reslt' is not defined")
    assert filter_reason(failed, PairOptions()) == "--drop-tool-errors"
    assert filter_reason(failed, PairOptions(drop_tool_errors=False)) is None
    fixed = failed[:-1] + [
        {"role": "assistant", "content": "Fix it.\n```python\nprint(7)\n```"},
        {"role": "tool", "content": "7"},
        {"role": "assistant", "content": "\\boxed{7}"},
    ]
    assert filter_reason(fixed, PairOptions()) is None


def test_drop_tool_errors_on_the_research_format_outputs_as_user_turns():
    gemma = [
        dict(m, role="user") if m["role"] == "tool" else m
        for m in solved("7", output="SyntaxError: '(' was never closed")
    ]
    assert filter_reason(gemma, PairOptions()) == "--drop-tool-errors"


def test_a_trajectory_is_counted_under_the_first_filter_it_fails():
    assert (
        filter_reason([{"role": "user", "content": "q"}, {"role": "tool", "content": "error"}], PairOptions())
        == "--min-messages"
    )


# ── one problem end to end ────────────────────────────────────────────────────


def test_duplicates_are_removed_by_the_assistant_turns(tmp_path):
    same_solution_other_output = dict(row("p", 0.0, "41"), messages=solved("41", output="41 "))
    rows = [row("p", 1.0, "42"), row("p", 1.0, "42"), row("p", 0.0, "41"), same_solution_other_output]
    numbers, written = run(tmp_path, rows, PairOptions(rule="all"))
    assert (numbers["duplicates"], numbers["kept"], len(written)) == (2, 2, 1)
    numbers, written = run(tmp_path, rows, PairOptions(rule="all", dedup=False))
    assert (numbers["duplicates"], numbers["kept"], len(written)) == (0, 4, 4)


def test_hand_worked_summary(tmp_path):
    rows = [
        row("a", 1.0, "42"),
        row("a", 0.0, "1"),
        row("a", 0.0, "2"),
        row("a", 0.0, "3"),  # pass@1 1/4
        row("b", 0.0, "1"),
        row("b", 0.0, "2"),  # all wrong
        row("c", 1.0, "42"),
        row("c", 1.0, "41"),  # all correct
        row("d", 0.9, "42"),
        dict(row("d", 0.2, "5"), messages=solved("5")[:2]),
    ]  # 0.2 one is filtered
    numbers, written = run(tmp_path, rows)
    assert [r["prompt_id"] for r in written] == ["a"]
    assert (numbers["problems"], numbers["problems_paired"], numbers["pairs"]) == (4, 1, 1)
    assert numbers["skipped"] == {
        "all correct": 2,
        "all wrong": 1,
        "rewards closer than --min-margin": 0,
        "no trajectory kept": 0,
    }
    assert numbers["filter_reasons"]["--min-messages"] == 1
    assert numbers["pass@1"] == pytest.approx((0.25 + 0 + 1 + 0.5) / 4)
    assert numbers["pass@n"] == pytest.approx(3 / 4)
    assert (numbers["chosen_reward_mean"], numbers["rejected_reward_mean"]) == (1.0, 0.0)
    accounted(numbers)


def test_mean_rewards_of_max_min_pairs(tmp_path):
    rows = [row("a", 0.9, "1"), row("a", 0.3, "2"), row("b", 0.7, "1"), row("b", 0.1, "2"), row("b", 0.4, "3")]
    numbers, written = run(tmp_path, rows, PairOptions(rule="max-min"))
    assert [(r["chosen_reward"], r["rejected_reward"]) for r in written] == [(0.9, 0.3), (0.7, 0.1)]
    assert numbers["chosen_reward_mean"] == pytest.approx(0.8) and numbers["rejected_reward_mean"] == pytest.approx(0.2)


def test_min_margin_skips_a_problem_and_says_why(tmp_path):
    rows = [row("a", 0.55, "1"), row("a", 0.45, "2"), row("b", 1.0, "1"), row("b", 0.0, "2")]
    numbers, written = run(tmp_path, rows, PairOptions(min_margin=0.5))
    assert [r["prompt_id"] for r in written] == ["b"]
    assert numbers["skipped"]["rewards closer than --min-margin"] == 1


def test_all_pairs_with_a_cap_end_to_end(tmp_path):
    rows = [row("a", 1.0, str(n)) for n in range(3)] + [row("a", 0.0, str(n)) for n in range(3, 6)]
    numbers, written = run(tmp_path, rows, PairOptions(rule="all", max_pairs_per_prompt=4))
    assert numbers["pairs"] == len(written) == 4
    assert len({json.dumps([r["chosen"], r["rejected"]]) for r in written}) == 4
    assert run(tmp_path, rows, PairOptions(rule="all", max_pairs_per_prompt=4))[1] == written


def test_research_field_names_and_carried_keys(tmp_path):
    tools = [{"type": "function", "function": {"name": "python", "parameters": {"type": "object", "properties": {}}}}]
    rows = [
        {
            "idx": 7,
            "messages": solved("42"),
            "score": [True],
            "gt": "42",
            "tools": tools,
            "chat_template_kwargs": {"enable_thinking": False},
        },
        {"idx": 7, "messages": solved("41"), "score": [False], "gt": "42", "level": "Level 5"},
    ]
    _, [pair] = run(tmp_path, rows)
    assert pair == {
        "prompt_id": 7,
        "chosen": solved("42"),
        "rejected": solved("41"),
        "chosen_reward": 1.0,
        "rejected_reward": 0.0,
        "gt": "42",
        "tools": tools,
        "chat_template_kwargs": {"enable_thinking": False},
    }


def test_correct_booleans_count_as_1_and_0(tmp_path):
    rows = [
        {"prompt_id": "p", "messages": solved("1"), "correct": False},
        {"prompt_id": "p", "messages": solved("42"), "correct": True},
    ]
    _, [pair] = run(tmp_path, rows)
    assert (pair["chosen"], pair["chosen_reward"], pair["rejected_reward"]) == (solved("42"), 1.0, 0.0)


def test_kto_rows(tmp_path):
    rows = [row("a", 1.0, "42"), row("a", 0.0, "1"), row("a", 0.0, "2"), row("b", 1.0, "42")]
    numbers, written = run(tmp_path, rows, PairOptions(kto=True))
    assert sorted((r["prompt_id"], r["label"], r["reward"]) for r in written) == [("a", False, 0.0), ("a", True, 1.0)]
    assert set(written[0]) == {"prompt_id", "messages", "label", "reward"}
    assert (numbers["desirable"], numbers["undesirable"]) == (1, 1)
    # --rule all: every kept trajectory of "a", not balanced
    numbers, written = run(tmp_path, rows, PairOptions(kto=True, rule="all"))
    assert (numbers["desirable"], numbers["undesirable"], numbers["pairs"], len(written)) == (1, 2, 2, 3)
    assert numbers["rejected_reward_mean"] == 0.0 and numbers["chosen_reward_mean"] == 1.0


# ── reproducibility and order ─────────────────────────────────────────────────


def bundled_rows() -> list[dict]:
    return [json.loads(line) for line in BUNDLED.read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_bytes_other_seed_other_pairs(tmp_path):
    rows = bundled_rows()
    first, again = run(tmp_path, rows)[1], run(tmp_path, rows)[1]
    assert first == again
    assert run(tmp_path, rows, PairOptions(seed=7))[1] != first


def test_independent_of_row_problem_and_file_order(tmp_path):
    rows = bundled_rows()
    _, reference = run(tmp_path, rows, PairOptions(rule="all", max_pairs_per_prompt=3))
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):  # a problem's rows land in several files
        write_jsonl(shards / f"gen-{i}.jsonl", shuffled[i::3])
    _, written = run(tmp_path, shards, PairOptions(rule="all", max_pairs_per_prompt=3))

    def by_problem(rows: list[dict]) -> list[str]:
        return sorted(json.dumps(r, sort_keys=True) for r in rows)

    assert by_problem(written) == by_problem(reference)
    first_seen = list(dict.fromkeys(r["prompt_id"] for i in range(3) for r in shuffled[i::3]))
    order = list(dict.fromkeys(r["prompt_id"] for r in written))
    assert order == [p for p in first_seen if p in order]


def test_a_problem_split_over_two_files_is_one_problem(tmp_path):
    folder = tmp_path / "rollouts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [row("p", 1.0, "42"), row("q", 0.0, "1")])
    write_jsonl(folder / "b.jsonl", [row("p", 0.0, "41"), row("q", 1.0, "42")])
    numbers, written = run(tmp_path, folder)
    assert numbers["problems"] == 2 and [r["prompt_id"] for r in written] == ["p", "q"]


def test_many_buckets_give_the_same_output(tmp_path, monkeypatch):
    rows = bundled_rows()
    _, one_bucket = run(tmp_path, rows, PairOptions(rule="all"))
    monkeypatch.setattr(pairs, "BUCKET_BYTES", 4096)
    assert pairs.bucket_count([(BUNDLED, "")]) > 50
    _, many = run(tmp_path, rows, PairOptions(rule="all"))
    assert many == one_bucket


def test_7_and_the_string_7_are_two_problems(tmp_path):
    numbers, _ = run(tmp_path, [row(7, 1.0, "42"), row("7", 0.0, "1"), row(8, 1.0, "42"), row(8, 0.0, "1")])
    assert numbers["problems"] == 3 and numbers["skipped"]["all correct"] == numbers["skipped"]["all wrong"] == 1


# ── bad input ─────────────────────────────────────────────────────────────────

BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "not a JSON object"),
    ({"messages": solved("1"), "reward": 1.0}, "missing prompt_id (or idx)"),
    ({"prompt_id": ["p"], "messages": solved("1"), "reward": 1.0}, "prompt_id must be a string or an integer"),
    ({"prompt_id": "p", "messages": solved("1")}, "missing reward (reward, score or correct)"),
    ({"prompt_id": "p", "messages": solved("1"), "reward": "1"}, "reward must be a number or a boolean"),
    ('{"prompt_id": "p", "messages": [], "reward": NaN}', "reward is not finite"),
    ('{"prompt_id": "p", "messages": [], "reward": 1' + "0" * 400 + "}", "reward is not finite"),
    ('{"prompt_id": "p", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON"),
    (
        {"prompt_id": "p", "messages": solved("1"), "reward": True},
        "reward is a boolean but the input's first reward is a number",
    ),
    ({"prompt_id": "p", "messages": "hi", "reward": 1.0}, "messages missing or not a list"),
    ({"prompt_id": "p", "messages": [], "reward": 1.0}, "messages is empty"),
    (
        {"prompt_id": "p", "messages": [{"content": "hi"}], "reward": 1.0},
        "a message is not an object with a string role",
    ),
]


def test_bad_rows_are_rejected_with_their_reason_and_the_run_goes_on(tmp_path):
    rows = [row("p", 1.0, "42"), *(bad for bad, _ in BAD_ROWS), "", row("p", 0.0, "41")]
    numbers, written = run(tmp_path, rows)
    assert len(written) == 1
    assert rejects(tmp_path) == [
        {"file": "rollouts.jsonl", "row": n, "reason": reason} for n, (_, reason) in enumerate(BAD_ROWS, 1)
    ]
    assert numbers["rows"] == len(BAD_ROWS) + 2  # the blank line is no row
    assert numbers["reject_reasons"] == Counter(reason for _, reason in BAD_ROWS)
    accounted(numbers)


def test_clean_input_writes_an_empty_rejects_file(tmp_path):
    numbers, _ = run(tmp_path, [row("p", 1.0), row("p", 0.0, "1")])
    assert numbers["rejected"] == 0 and rejects(tmp_path) == []


def test_rejects_name_the_file_of_a_directory_input(tmp_path):
    folder = tmp_path / "rollouts"
    (folder / "gen").mkdir(parents=True)
    write_jsonl(folder / "gen" / "shard-1.jsonl", [row("p", 1.0), row("p", 0.5, "1"), row("p", False, "2")])
    write_jsonl(folder / ".hidden.jsonl", ["not even json"])
    numbers, _ = run(tmp_path, folder)
    assert rejects(tmp_path) == [
        {
            "file": "gen/shard-1.jsonl",
            "row": 2,
            "reason": "reward is a boolean but the input's first reward is a number",
        }
    ]
    with pytest.raises(UsageError, match=r"^gen/shard-1.jsonl row 2: reward is a boolean"):
        run(tmp_path, folder, strict=True)


def test_strict_stops_at_the_first_bad_row_and_writes_nothing(tmp_path):
    with pytest.raises(
        UsageError, match=r"^rollouts.jsonl row 1: missing reward \(reward, score or correct\) \(--strict"
    ):
        run(tmp_path, [row("p", 1.0), {"prompt_id": "p", "messages": solved("1")}, row("p", 0.0, "1")], strict=True)
    assert sorted(os.listdir(tmp_path)) == ["rollouts.jsonl"]


def test_no_pair_at_all_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(UsageError, match="no pairs from 1 problems \\(1 all correct\\); nothing written"):
        run(tmp_path, [row("p", 1.0, "1"), row("p", 1.0, "2")])
    assert sorted(os.listdir(tmp_path)) == ["rollouts.jsonl"]


def test_paths_that_are_refused(tmp_path):
    source = write_jsonl(tmp_path / "r.jsonl", [row("p", 1.0), row("p", 0.0, "1")])
    with pytest.raises(UsageError, match="would overwrite the input"):
        make_pairs_file(source, source, overwrite=True)
    with pytest.raises(UsageError, match="is inside the input directory"):
        make_pairs_file(tmp_path, tmp_path / "out" / "pairs.jsonl")
    make_pairs_file(source, tmp_path / "out" / "pairs.jsonl")
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        make_pairs_file(source, tmp_path / "out" / "pairs.jsonl")
    assert sorted(os.listdir(tmp_path / "out")) == ["pairs.jsonl", "pairs.rejects.jsonl"]  # no temporary left
    with pytest.raises(UsageError, match="input not found"):
        make_pairs_file(tmp_path / "nope.jsonl", tmp_path / "x.jsonl")
    with pytest.raises(UsageError, match="applies to --rule all only"):
        make_pairs_file(source, tmp_path / "x.jsonl", PairOptions(max_pairs_per_prompt=2))
    with pytest.raises(UsageError, match="--min-margin must be"):
        make_pairs_file(source, tmp_path / "x.jsonl", PairOptions(min_margin=math.inf))


# ── the command line and preprocess ───────────────────────────────────────────


def table(stdout: str) -> dict:
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if "│" in line]
    return dict(cells)


def test_cli_summary_and_json(tmp_path):
    result = invoke("pairs", BUNDLED, "--out", tmp_path / "p.jsonl")
    assert result.exit_code == 0, result.output
    numbers = make_pairs_file(BUNDLED, tmp_path / "q.jsonl")
    summary = table(result.stdout)
    assert summary["rows"] == "320" and summary["pairs"] == f"{numbers['pairs']:,}" and numbers["pairs"] > 10
    assert summary["pass@1 / pass@N of the rollouts"] == f"{numbers['pass@1']:.3f} / {numbers['pass@n']:.3f}"
    result = invoke("pairs", BUNDLED, "--out", tmp_path / "p.jsonl", "--overwrite", "--json", "--rule", "max-min")
    assert json.loads(result.stdout)["options"]["rule"] == "max-min"
    assert invoke("pairs", BUNDLED, "--out", tmp_path / "p.jsonl", "--overwrite", "-q").stdout == ""


def test_cli_default_output_sits_beside_the_input(tmp_path):
    source = write_jsonl(tmp_path / "iter1.jsonl", bundled_rows())
    assert invoke("pairs", source, "-q").exit_code == 0 and (tmp_path / "iter1.pairs.jsonl").exists()
    assert invoke("pairs", source, "-q", "--kto").exit_code == 0 and (tmp_path / "iter1.kto.jsonl").exists()
    assert (tmp_path / "iter1.pairs.rejects.jsonl").exists() and (tmp_path / "iter1.kto.rejects.jsonl").exists()


def test_cli_errors_are_one_line_exit_2(tmp_path):
    assert_user_error(
        invoke("pairs", tmp_path / "nope.jsonl", "--out", tmp_path / "p.jsonl"),
        f"input not found: {tmp_path / 'nope.jsonl'}",
    )
    assert_user_error(
        invoke("pairs", BUNDLED, "--out", tmp_path / "p.jsonl", "--rule", "best"),
        "--rule must be one of random, max-min, all, not 'best'",
    )
    (tmp_path / "p.jsonl").write_text("")
    assert_user_error(
        invoke("pairs", BUNDLED, "--out", tmp_path / "p.jsonl"),
        f"output {tmp_path / 'p.jsonl'} already exists; pass --overwrite to replace it",
    )


def test_cli_strict_is_one_line_naming_the_row(tmp_path):
    source = write_jsonl(tmp_path / "r.jsonl", [row("p", 1.0), "{oops", row("p", 0.0, "1")])
    assert invoke("pairs", source, "--out", tmp_path / "p.jsonl", "-q").exit_code == 0
    assert_user_error(
        invoke("pairs", source, "--out", tmp_path / "q.jsonl", "--strict"),
        "r.jsonl row 1: not valid JSON (--strict stops at the first bad row)",
    )
    assert not (tmp_path / "q.jsonl").exists()


def test_cli_help_lists_every_option():
    result = invoke("pairs", "--help", env={"COLUMNS": "200"})  # wide: long option names are not wrapped
    flat = " ".join(result.stdout.replace("│", " ").split())
    for option in (
        "--out",
        "--rule",
        "--kto",
        "--seed",
        "--correct-threshold",
        "--min-margin",
        "--max-pairs-per-prompt",
        "--min-messages",
        "--end-with-assistant",
        "--no-end-with-assistant",
        "--require-code",
        "--drop-tool-errors",
        "--no-dedup",
        "--strict",
        "--overwrite",
        "--json",
        "On by default, as in the paper",
    ):
        assert option in flat, option


def test_bundled_rollouts_are_what_the_script_writes(tmp_path):
    subprocess.run(
        [sys.executable, REPO / "scripts" / "make_rollouts.py", "--out", tmp_path / "r.jsonl"],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert (tmp_path / "r.jsonl").read_bytes() == BUNDLED.read_bytes()


def test_round_two_rollouts_are_what_the_script_writes_with_seed_1(tmp_path):
    """The iterative-round demo's stand-in for the round-1 model's rollouts: other problems."""
    subprocess.run(
        [sys.executable, REPO / "scripts" / "make_rollouts.py", "--out", tmp_path / "r2.jsonl", "--seed", "1"],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    round2 = BUNDLED.with_name("rollouts-round2.jsonl")
    assert (tmp_path / "r2.jsonl").read_bytes() == round2.read_bytes() != BUNDLED.read_bytes()


def test_preprocess_accepts_the_pairs_of_the_bundled_rollouts(tmp_path):
    command = [sys.executable, "-m", "mtdpo"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    subprocess.run([*command, "pairs", BUNDLED, "--out", tmp_path / "pairs.jsonl", "-q"], check=True, env=env)
    subprocess.run(
        [*command, "preprocess", tmp_path / "pairs.jsonl", "--out", tmp_path / "cache", "-q"], check=True, env=env
    )
    stats = json.loads((tmp_path / "cache" / "stats.json").read_text())
    assert stats["kept"] > 0 and stats["rejected"] == 0
