"""Preference pairs (or KTO rows) from graded multi-turn rollouts: `mtdpo pairs`.

One round of "Building Math Agents with Multi-Turn Iterative Preference Learning" (Xiong et al.
2024) samples N trajectories per problem from the current model with a Python tool, grades
each final answer, and turns them into DPO pairs. The research code
(`inference/infer_data/get_dpo_dataset.py` of the paper's repository) does, per problem:

1. filter trajectories: at least 4 messages and an even count (in its strictly alternating
   user/assistant data: the trajectory ends with the model's answer, not on a tool output);
   the last tool output must not contain "error" (a final answer right after a failed run is a
   guess, even when it happens to be right); every assistant turn before the last must contain
   code ("python");
2. de-duplicate identical solutions of one problem;
3. pair one random correct trajectory with one random incorrect one; problems whose
   trajectories are all correct or all wrong give no pair.

mtdpo keeps these rules as named options, on by default, and generalises them to OpenAI-style
messages: system messages are not counted (the research data had none), "ends with the
model's answer" replaces the even count (which miscounts a turn that makes two tool calls), a
tool call counts as code. The research filters that name one sandbox's crash messages
("ipython", "traitlets" …) are left out. Two more rules are offered: `max-min` (highest vs lowest
reward) and `all` (every better × worse pair, optionally capped).

Selection is a pure function of (the problem's trajectories, the seed, the problem id): each
problem's trajectories are put in a canonical order and its random choices come from an RNG
seeded with (seed, prompt id), so the output does not depend on the order of files, problems
or rows. Output rows keep the order in which problems first appear in the input.

The input is streamed. Rows are hash-partitioned by problem id into bucket files beside the
output (a problem's rows may come from several generation shards), then each bucket is read
back and its problems paired; the buckets' outputs are merged in order of first appearance.
Memory holds one bucket (BUCKET_BYTES of input) at a time, whatever the row count, up to
MAX_BUCKETS buckets (4 GB of input; past that the buckets grow).
"""

from __future__ import annotations

import heapq
import json
import math
import os
import random
import shutil
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtdpo.errors import UsageError

RULES = ("random", "max-min", "all")
ID_FIELDS = ("prompt_id", "idx")  # idx: the research code's name
REWARD_FIELDS = ("reward", "score", "correct")  # score: the research code's, often a one-item list
CARRIED_FIELDS = ("gt", "tools", "chat_template_kwargs")  # copied from the row to its output
TOOL_ROLES = ("tool", "observation", "ipython", "function")
SYSTEM_ROLES = ("system", "developer")
CODE_FENCE = "```python"  # what the research agent loop executes
BUCKET_BYTES = 16 << 20  # input bytes per bucket: what one bucket holds in memory
MAX_BUCKETS = 256  # bucket files open at once while partitioning
FILTERS = ("--min-messages", "--end-with-assistant", "--require-code", "--drop-tool-errors")  # checked in this order
SKIP_REASONS = ("all correct", "all wrong", "rewards closer than --min-margin", "no trajectory kept")
MARGIN_TOLERANCE = 1e-9  # 0.3 - 0.1 is 0.19999999999999998: it still meets --min-margin 0.2
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class PairOptions:
    """Everything that decides which rows `mtdpo pairs` writes (the CLI's options)."""

    rule: str = "random"
    seed: int = 42
    correct_threshold: float = 0.5
    min_margin: float = 0.0
    max_pairs_per_prompt: int | None = None  # --rule all only; None: every pair
    min_messages: int = 4
    end_with_assistant: bool = True
    require_code: bool = True
    drop_tool_errors: bool = True
    dedup: bool = True
    kto: bool = False


class RowError(ValueError):
    """Why an input row cannot be used at all (a reject, as opposed to a filtered trajectory)."""


@dataclass
class Trajectory:
    prompt_id: str | int
    messages: list[dict]
    reward: float
    carried: dict  # CARRIED_FIELDS present in the row
    raw: bytes = b""  # the line as read: its canonical place among the problem's rows

    def correct(self, threshold: float) -> bool:
        return self.reward > threshold


# ── one row ──────────────────────────────────────────────────────────────────


def parse_line(raw: bytes) -> dict:
    """The row a JSON line holds, or RowError."""
    try:
        row = json.loads(raw)
    except (ValueError, RecursionError):  # bad syntax or UTF-8, a 5,000-digit number, lists nested too deep
        raise RowError("not valid JSON") from None
    if not isinstance(row, dict):
        raise RowError("not a JSON object")
    return row


def trajectory_of(row: dict) -> tuple[Trajectory, str]:
    """A validated trajectory and the kind of its reward ("boolean" or "number"), or RowError."""
    prompt_id = next((row[name] for name in ID_FIELDS if name in row), None)
    if prompt_id is None:
        raise RowError("missing prompt_id (or idx)")
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
        raise RowError("prompt_id must be a string or an integer")
    reward, kind = reward_of(row)
    messages = row.get("messages")
    if not isinstance(messages, list):
        raise RowError("messages missing or not a list")
    if not messages:
        raise RowError("messages is empty")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise RowError("a message is not an object with a string role")
    carried = {name: row[name] for name in CARRIED_FIELDS if name in row}
    return Trajectory(prompt_id, messages, reward, carried), kind


def reward_of(row: dict) -> tuple[float, str]:
    """The row's reward as a float (booleans as 1/0) and its kind, or RowError."""
    name = next((name for name in REWARD_FIELDS if name in row), None)
    if name is None:
        raise RowError("missing reward (reward, score or correct)")
    value = row[name]
    if isinstance(value, list) and len(value) == 1:  # the research code grades into [True]
        value = value[0]
    if isinstance(value, bool):
        return float(value), "boolean"
    if not isinstance(value, (int, float)):
        raise RowError("reward must be a number or a boolean")
    try:
        reward = float(value)
    except OverflowError:  # an integer beyond float's range
        raise RowError("reward is not finite") from None
    if not math.isfinite(reward):
        raise RowError("reward is not finite")
    return reward, "number"


def problem_key(prompt_id: str | int) -> str:
    """The id as JSON: 7 and "7" are different problems, as they are different values."""
    return json.dumps(prompt_id)


# ── the research filters ─────────────────────────────────────────────────────


def text_of(message: dict) -> str:
    """A message's text: a string, text parts joined, or "" for none."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def conversation_length(messages: list[dict]) -> int:
    """Messages other than system ones: the research data had no system message."""
    return sum(m["role"] not in SYSTEM_ROLES for m in messages)


def ends_with_assistant(messages: list[dict]) -> bool:
    """The trajectory ended with the model's answer, not cut off after a tool output."""
    return messages[-1]["role"] == "assistant"


def calls_code(message: dict) -> bool:
    return bool(message.get("tool_calls")) or CODE_FENCE in text_of(message)


def every_step_calls_code(messages: list[dict]) -> bool:
    """Each assistant turn before the last message runs code (research: contains "python")."""
    return all(calls_code(m) for m in messages[:-1] if m["role"] == "assistant")


def last_tool_output(messages: list[dict]) -> dict | None:
    """The last tool message; in data where outputs come back as user turns (the research's
    Gemma format, which has no tool role) the last user turn after the question."""
    tools = [m for m in messages if m["role"] in TOOL_ROLES]
    if tools:
        return tools[-1]
    users = [m for m in messages if m["role"] == "user"]
    return users[-1] if len(users) > 1 else None


def last_tool_output_has_error(messages: list[dict]) -> bool:
    output = last_tool_output(messages)
    return output is not None and "error" in text_of(output).lower()


def filter_reason(messages: list[dict], options: PairOptions) -> str | None:
    """The option that drops this trajectory (the first of FILTERS that does), or None."""
    if conversation_length(messages) < options.min_messages:
        return "--min-messages"
    if options.end_with_assistant and not ends_with_assistant(messages):
        return "--end-with-assistant"
    if options.require_code and not every_step_calls_code(messages):
        return "--require-code"
    if options.drop_tool_errors and last_tool_output_has_error(messages):
        return "--drop-tool-errors"
    return None


# ── de-duplication ───────────────────────────────────────────────────────────


def solution_key(messages: list[dict]) -> str:
    """What the model wrote: its turns' content, reasoning and tool calls (the prompt and the
    tool outputs follow from them)."""
    generated = [
        (m.get("content"), m.get("reasoning_content"), m.get("tool_calls"))
        for m in messages
        if m["role"] == "assistant"
    ]
    return json.dumps(generated, sort_keys=True, ensure_ascii=False)


def deduplicate(trajectories: list[Trajectory]) -> list[Trajectory]:
    """The first trajectory of each distinct solution, in the given order."""
    seen: set[str] = set()
    kept = []
    for trajectory in trajectories:
        key = solution_key(trajectory.messages)
        if key not in seen:
            seen.add(key)
            kept.append(trajectory)
    return kept


# ── the selection rules: rewards in, (better, worse) index pairs out ──────────


def meets_margin(better: float, worse: float, min_margin: float) -> bool:
    return better > worse and better - worse >= min_margin - MARGIN_TOLERANCE


def pairs_random(
    rewards: list[float], threshold: float, min_margin: float, rng: random.Random
) -> list[tuple[int, int]]:
    """The paper's rule: one random correct vs one random incorrect trajectory.

    A uniform choice among the (correct, incorrect) pairs that meet the margin; with no margin
    that is a random correct one and, independently, a random incorrect one.
    """
    correct = [i for i, r in enumerate(rewards) if r > threshold]
    wrong = [j for j, r in enumerate(rewards) if r <= threshold]
    eligible = [(i, j) for i in correct for j in wrong if meets_margin(rewards[i], rewards[j], min_margin)]
    return [rng.choice(eligible)] if eligible else []


def pairs_max_min(rewards: list[float], min_margin: float, rng: random.Random) -> list[tuple[int, int]]:
    """Highest vs lowest reward; among tied trajectories a random one."""
    high, low = max(rewards), min(rewards)
    if not meets_margin(high, low, min_margin):
        return []
    best = rng.choice([i for i, r in enumerate(rewards) if r == high])
    worst = rng.choice([j for j, r in enumerate(rewards) if r == low])
    return [(best, worst)]


def pairs_all(rewards: list[float], min_margin: float, cap: int | None, rng: random.Random) -> list[tuple[int, int]]:
    """Every (better, worse) pair that meets the margin (ties make none); over `cap`, a random
    `cap` of them, kept in their order."""
    eligible = [
        (i, j) for i, ri in enumerate(rewards) for j, rj in enumerate(rewards) if meets_margin(ri, rj, min_margin)
    ]
    if cap is None or len(eligible) <= cap:
        return eligible
    return [eligible[k] for k in sorted(rng.sample(range(len(eligible)), cap))]


def select_pairs(rewards: list[float], options: PairOptions, rng: random.Random) -> list[tuple[int, int]]:
    if options.rule == "random":
        return pairs_random(rewards, options.correct_threshold, options.min_margin, rng)
    if options.rule == "max-min":
        return pairs_max_min(rewards, options.min_margin, rng)
    return pairs_all(rewards, options.min_margin, options.max_pairs_per_prompt, rng)


def problem_rng(seed: int, key: str) -> random.Random:
    """The RNG of one problem: its choices do not depend on which problems came before it."""
    return random.Random(f"{seed}\0{key}")  # a str seed is hashed with SHA-512: the same in every process


def skip_reason(rewards: list[float], threshold: float) -> str:
    """Why a problem gave no pair."""
    if not rewards:
        return "no trajectory kept"
    if all(r > threshold for r in rewards):
        return "all correct"
    if all(r <= threshold for r in rewards):
        return "all wrong"
    return "rewards closer than --min-margin"


# ── output rows ──────────────────────────────────────────────────────────────


def pair_row(chosen: Trajectory, rejected: Trajectory) -> dict:
    """A row `mtdpo preprocess` reads: two full conversations (it finds the shared prompt).
    gt, tools and chat_template_kwargs come from the chosen trajectory's row."""
    row = {
        "prompt_id": chosen.prompt_id,
        "chosen": chosen.messages,
        "rejected": rejected.messages,
        "chosen_reward": chosen.reward,
        "rejected_reward": rejected.reward,
    }
    return {**row, **chosen.carried}


def kto_row(trajectory: Trajectory, threshold: float) -> dict:
    row = {
        "prompt_id": trajectory.prompt_id,
        "messages": trajectory.messages,
        "label": trajectory.correct(threshold),
        "reward": trajectory.reward,
    }
    return {**row, **trajectory.carried}


# ── the summary ──────────────────────────────────────────────────────────────


@dataclass
class Tally:
    """Counts of one run. Every row is rejected, filtered, a duplicate or kept; kept ones are
    used in an output row or not."""

    rows: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> rows
    trajectories: int = 0  # rows that are valid trajectories
    filtered: Counter = field(default_factory=Counter)  # option -> trajectories
    duplicates: int = 0
    kept: int = 0
    used: int = 0  # kept trajectories written in at least one output row
    problems: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> problems
    pairs: int = 0
    rows_written: int = 0
    desirable: int = 0  # --kto
    undesirable: int = 0
    chosen_reward_sum: float = 0.0  # chosen sides (--kto: desirable rows)
    rejected_reward_sum: float = 0.0
    solve_rate_sum: float = 0.0  # per problem: the share of its trajectories that are correct
    solved: int = 0  # problems with a correct trajectory


def summary(tally: Tally, options: PairOptions, rollouts: Path, out: Path) -> dict:
    """The numbers `--json` prints and the table shows."""

    def mean(total: float, count: int) -> float | None:
        return total / count if count else None

    chosen_count, rejected_count = (tally.desirable, tally.undesirable) if options.kto else (tally.pairs, tally.pairs)
    return {
        "input": str(rollouts),
        "out": str(out),
        "rejects": str(rejects_path(out)),
        "options": asdict(options),
        "rows": tally.rows,
        "rejected": sum(tally.rejected.values()),
        "reject_reasons": dict(tally.rejected),
        "trajectories": tally.trajectories,
        "filtered": sum(tally.filtered.values()),
        "filter_reasons": {name: tally.filtered[name] for name in FILTERS},
        "duplicates": tally.duplicates,
        "kept": tally.kept,
        "used": tally.used,
        "problems": tally.problems,
        "problems_paired": tally.problems - sum(tally.skipped.values()),
        "skipped": {reason: tally.skipped[reason] for reason in SKIP_REASONS},
        "pairs": tally.pairs,
        "rows_written": tally.rows_written,
        **({"desirable": tally.desirable, "undesirable": tally.undesirable} if options.kto else {}),
        "chosen_reward_mean": mean(tally.chosen_reward_sum, chosen_count),
        "rejected_reward_mean": mean(tally.rejected_reward_sum, rejected_count),
        "pass@1": mean(tally.solve_rate_sum, tally.problems),
        "pass@n": mean(tally.solved, tally.problems),
    }


def summary_lines(numbers: dict) -> list[tuple[str, str]]:
    """(label, value) lines of the summary table: where every row went, then what was made."""

    def number(value) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else f"{value:,}"

    def both(first, second) -> str:
        return f"{number(first)} / {number(second)}"

    kto = "desirable" in numbers
    lines = [("rows", numbers["rows"]), ("rejected", numbers["rejected"])]
    lines += [(f"  {reason}", count) for reason, count in numbers["reject_reasons"].items()]
    lines += [("trajectories", numbers["trajectories"]), ("filtered", numbers["filtered"])]
    lines += [(f"  by {option}", count) for option, count in numbers["filter_reasons"].items()]
    lines += [("duplicates removed", numbers["duplicates"]), ("kept", numbers["kept"]), ("  used", numbers["used"])]
    lines += [("problems", numbers["problems"]), ("  paired", numbers["problems_paired"])]
    lines += [(f"  skipped: {reason}", count) for reason, count in numbers["skipped"].items()]
    lines += [("pairs", numbers["pairs"])]
    if kto:
        lines += [("KTO rows (desirable / undesirable)", both(numbers["desirable"], numbers["undesirable"]))]
    rewards = "mean reward (desirable / undesirable)" if kto else "mean reward (chosen / rejected)"
    lines += [
        (rewards, both(numbers["chosen_reward_mean"], numbers["rejected_reward_mean"])),
        ("pass@1 / pass@N of the rollouts", both(numbers["pass@1"], numbers["pass@n"])),
    ]
    return [(label, value if isinstance(value, str) else number(value)) for label, value in lines]


def summary_table(numbers: dict):
    """The summary as a rich table (reasons and paths are text, never markup)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"pairs → {escape(numbers['out'])}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in summary_lines(numbers):
        table.add_row(escape(label), value)
    return table


# ── one problem ──────────────────────────────────────────────────────────────


def process_problem(trajectories: list[Trajectory], options: PairOptions, tally: Tally) -> list[dict]:
    """The output rows of one problem's trajectories (in any order), counted into `tally`."""
    trajectories = sorted(trajectories, key=lambda t: t.raw)  # canonical: the input's row order does not matter
    count_rollouts(trajectories, options.correct_threshold, tally)
    kept = kept_trajectories(trajectories, options, tally)
    rewards = [t.reward for t in kept]
    pairs = select_pairs(rewards, options, problem_rng(options.seed, problem_key(kept[0].prompt_id))) if kept else []
    if not pairs:
        tally.skipped[skip_reason(rewards, options.correct_threshold)] += 1
        return []
    tally.pairs += len(pairs)
    used = sorted({i for pair in pairs for i in pair})
    tally.used += len(used)
    rows = (
        [kto_row(kept[i], options.correct_threshold) for i in used]
        if options.kto
        else [pair_row(kept[i], kept[j]) for i, j in pairs]
    )
    tally.rows_written += len(rows)
    for row in rows:
        count_rewards(row, tally)
    return rows


def count_rollouts(trajectories: list[Trajectory], threshold: float, tally: Tally) -> None:
    """pass@1 and pass@N count every graded trajectory: they measure the model, not the filters."""
    solve_rate = sum(t.correct(threshold) for t in trajectories) / len(trajectories)
    tally.problems += 1
    tally.trajectories += len(trajectories)
    tally.solve_rate_sum += solve_rate
    tally.solved += solve_rate > 0


def kept_trajectories(trajectories: list[Trajectory], options: PairOptions, tally: Tally) -> list[Trajectory]:
    """The trajectories that pass the filters, de-duplicated (the research code's order: filter, then de-duplicate)."""
    passing = []
    for trajectory in trajectories:
        reason = filter_reason(trajectory.messages, options)
        if reason:
            tally.filtered[reason] += 1
        else:
            passing.append(trajectory)
    kept = deduplicate(passing) if options.dedup else passing
    tally.duplicates += len(passing) - len(kept)
    tally.kept += len(kept)
    return kept


def count_rewards(row: dict, tally: Tally) -> None:
    if "label" not in row:
        tally.chosen_reward_sum += row["chosen_reward"]
        tally.rejected_reward_sum += row["rejected_reward"]
    elif row["label"]:
        tally.desirable += 1
        tally.chosen_reward_sum += row["reward"]
    else:
        tally.undesirable += 1
        tally.rejected_reward_sum += row["reward"]


# ── the input ────────────────────────────────────────────────────────────────


def rollout_files(rollouts: Path) -> list[tuple[Path, str]]:
    """(path, name for rejects): the file itself, or a directory's .jsonl files (recursively,
    hidden ones skipped) in sorted path order."""
    if rollouts.is_file():
        return [(rollouts, rollouts.name)]
    if not rollouts.is_dir():
        raise UsageError(f"input not found: {rollouts}")
    files = [
        (path, str(path.relative_to(rollouts)))
        for path in sorted(rollouts.rglob("*.jsonl"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(rollouts).parts)
    ]
    if not files:
        raise UsageError(f"no .jsonl files under {rollouts}")
    return files


def read_lines(files: list[tuple[Path, str]]) -> Iterator[tuple[str, int, bytes]]:
    """(file name, 0-based line number, line) for every non-blank line, as preprocess numbers rows."""
    for path, name in files:
        with open(path, "rb") as f:
            for n, line in enumerate(f):
                line = line.removeprefix(BOM).strip()
                if line:
                    yield name, n, line


def default_output(rollouts: Path, kto: bool = False) -> Path:
    """rollouts/iter1.jsonl -> rollouts/iter1.pairs.jsonl; a directory's output sits beside it."""
    return rollouts.with_name(rollouts.name.removesuffix(".jsonl") + (".kto.jsonl" if kto else ".pairs.jsonl"))


def rejects_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".rejects.jsonl")


def check_paths(rollouts: Path, out: Path, files: list[tuple[Path, str]], overwrite: bool) -> None:
    """Never write over the input, nor into an input directory (a later run would read the
    output as rollouts); an existing output only with --overwrite."""
    targets = {out.resolve(), rejects_path(out).resolve()}
    if targets & {path.resolve() for path, _ in files}:
        raise UsageError(f"--out {out} would overwrite the input")
    if rollouts.is_dir() and out.resolve().is_relative_to(rollouts.resolve()):
        raise UsageError(f"--out {out} is inside the input directory {rollouts}; write it elsewhere")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; name a .jsonl file")
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} already exists; pass --overwrite to replace it")


def check_options(options: PairOptions) -> None:
    if options.rule not in RULES:
        raise UsageError(f"--rule must be one of {', '.join(RULES)}, not {options.rule!r}")
    if options.max_pairs_per_prompt is not None and (options.rule != "all" or options.max_pairs_per_prompt < 1):
        raise UsageError("--max-pairs-per-prompt takes a positive number and applies to --rule all only")
    if not math.isfinite(options.min_margin) or options.min_margin < 0:
        raise UsageError(f"--min-margin must be a finite number >= 0, not {options.min_margin}")
    if not math.isfinite(options.correct_threshold):
        raise UsageError(f"--correct-threshold must be finite, not {options.correct_threshold}")
    if options.min_messages < 0:
        raise UsageError(f"--min-messages must be >= 0, not {options.min_messages}")


# ── the driver ───────────────────────────────────────────────────────────────


def make_pairs_file(
    rollouts: Path, out: Path, options: PairOptions = PairOptions(), *, strict: bool = False, overwrite: bool = False
) -> dict:
    """Read graded rollouts, write pairs (or KTO rows) to `out` and rejects beside it; return the summary.

    Both files are written under a temporary directory beside `out` and renamed into place
    when complete; an interrupted or failed run leaves neither.
    """
    rollouts, out = Path(rollouts), Path(out)
    check_options(options)
    files = rollout_files(rollouts)
    check_paths(rollouts, out, files, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(f"{out.parent}/.{out.name}.incomplete-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        tally = Tally()
        buckets = bucket_count(files)
        partition(files, work, buckets, tally, strict)
        if tally.rows == 0:
            raise UsageError(f"input {rollouts} holds no rows")
        written = write_rows(merge_buckets(work, buckets, options, tally), work / "out.jsonl")
        if written == 0:
            skipped = ", ".join(f"{count} {reason}" for reason, count in tally.skipped.most_common())
            raise UsageError(f"{rollouts}: no pairs from {tally.problems} problems ({skipped}); nothing written")
        os.replace(work / "rejects.jsonl", rejects_path(out))
        os.replace(work / "out.jsonl", out)
        return summary(tally, options, rollouts, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bucket_count(files: list[tuple[Path, str]]) -> int:
    total = sum(path.stat().st_size for path, _ in files)
    return min(MAX_BUCKETS, total // BUCKET_BYTES + 1)


def bucket_path(work: Path, bucket: int, kind: str = "rows") -> Path:
    return work / f"{kind}-{bucket:03d}.tsv"


def partition(files: list[tuple[Path, str]], work: Path, buckets: int, tally: Tally, strict: bool) -> None:
    """Validate every row; write each valid one to its problem's bucket as
    `sequence<TAB>problem key<TAB>line`, each reject to rejects.jsonl."""
    reward_kind = None  # the first valid row's; rows of the other kind are rejects
    outputs = [open(bucket_path(work, b), "wb") for b in range(buckets)]
    try:
        with open(work / "rejects.jsonl", "w", encoding="utf-8") as rejects:
            for name, n, line in read_lines(files):
                tally.rows += 1
                try:
                    trajectory, kind = trajectory_of(parse_line(line))
                    reward_kind = reward_kind or kind
                    if kind != reward_kind:
                        raise RowError(f"reward is a {kind} but the input's first reward is a {reward_kind}")
                except RowError as err:
                    if strict:
                        raise UsageError(f"{name} row {n}: {err} (--strict stops at the first bad row)") from None
                    tally.rejected[str(err)] += 1
                    rejects.write(json.dumps({"file": name, "row": n, "reason": str(err)}, ensure_ascii=False) + "\n")
                    continue
                key = problem_key(trajectory.prompt_id).encode()
                outputs[zlib.crc32(key) % buckets].write(b"%d\t%s\t%s\n" % (tally.rows, key, line))
    finally:
        for f in outputs:
            f.close()


def bucket_problems(path: Path) -> list[tuple[int, list[bytes]]]:
    """One bucket's problems as (first sequence number, their lines), in order of first appearance."""
    problems: dict[bytes, list] = defaultdict(lambda: [math.inf, []])
    with open(path, "rb") as f:
        for record in f:
            sequence, key, line = record.rstrip(b"\n").split(b"\t", 2)
            problem = problems[key]
            problem[0] = min(problem[0], int(sequence))
            problem[1].append(line)
    return sorted(map(tuple, problems.values()))


def pair_bucket(work: Path, bucket: int, options: PairOptions, tally: Tally) -> Path:
    """Pair one bucket's problems; write `sequence<TAB>row` lines in order of first appearance."""
    path = bucket_path(work, bucket, "pairs")
    with open(path, "w", encoding="utf-8") as f:
        for first, lines in bucket_problems(bucket_path(work, bucket)):
            trajectories = []
            for line in lines:
                trajectory, _ = trajectory_of(parse_line(line))  # valid: partition checked it
                trajectory.raw = line
                trajectories.append(trajectory)
            for row in process_problem(trajectories, options, tally):
                f.write(f"{first:012d}\t{json.dumps(row, ensure_ascii=False)}\n")
    bucket_path(work, bucket).unlink()
    return path


def merge_buckets(work: Path, buckets: int, options: PairOptions, tally: Tally) -> Iterator[str]:
    """Every output row, in order of its problem's first appearance in the input."""
    paths = [pair_bucket(work, b, options, tally) for b in range(buckets)]
    files = [open(path, encoding="utf-8", newline="\n") for path in paths]  # lines end at \n only, as written
    try:
        # Each bucket is sorted; a problem's rows sit in one bucket, so ties keep their order.
        for line in heapq.merge(*files, key=lambda line: line[:12]):
            yield line[13:]
    finally:
        for f in files:
            f.close()


def write_rows(lines: Iterator[str], path: Path) -> int:
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            written += 1
    return written
