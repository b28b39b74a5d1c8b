"""Deterministic synthetic graded rollouts: N trajectories per math problem, as an agent loop
writes them before `mtdpo pairs` (the bundled rollouts, tests and the pairs benchmark).

Each row is ``{"prompt_id", "messages", "reward", "gt"}``: the problems and the step texts of
`mtdpo.synthetic` (reasoning, ```python code, ```output tool turns, a \\boxed{} answer), a right
or a wrong solution plan per trajectory. Each problem gets a solve rate drawn uniformly, so some
problems are solved by every trajectory and some by none, as in real rollouts; plans repeat, so
identical solutions occur; some plans answer without code or after a traceback, and some
trajectories are cut off after a tool output, which the research filters drop.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from mtdpo.synthetic import CHOSEN, REJECTED, SYSTEMS, USER_SUFFIX, _problem, _steps

CUT_OFF = 0.05  # share of trajectories that stop after a tool output (max calls reached)


def make_rollouts(problems: int, per_problem: int = 8, seed: int = 0) -> Iterator[dict]:
    """Yield ``problems * per_problem`` trajectories, problem by problem; the same arguments
    always give the same rows."""
    r = random.Random(seed)
    for k in range(problems):
        p = _problem(r)
        prompt = [{"role": "system", "content": r.choice(SYSTEMS)}, {"role": "user", "content": p["q"] + USER_SUFFIX}]
        solve_rate = r.random()
        for _ in range(per_problem):
            correct = r.random() < solve_rate
            messages = prompt + _steps(r, p, r.choice(CHOSEN if correct else REJECTED))
            if len(messages) > 4 and r.random() < CUT_OFF:
                messages = messages[:-1]  # ends on a tool output: an answer never came
                correct = False
            yield {"prompt_id": f"problem-{k:05d}", "messages": messages, "reward": float(correct), "gt": p["ans"]}


def write_rollouts(path: Path, problems: int, per_problem: int = 8, seed: int = 0, shards: int = 1) -> list[Path]:
    """Write the rollouts as JSON lines: one file, or `shards` files in a directory with the
    trajectories dealt round-robin (a problem's rows spread over shards, as from parallel
    generation). Returns the files written."""
    path = Path(path)
    if shards == 1:
        files = [path]
    else:
        path.mkdir(parents=True, exist_ok=True)
        files = [path / f"shard-{i:02d}.jsonl" for i in range(shards)]
    handles = [open(file, "w", encoding="utf-8") for file in files]
    try:
        for n, row in enumerate(make_rollouts(problems, per_problem, seed)):
            handles[n % shards].write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        for f in handles:
            f.close()
    return files
