"""How long `mtdpo pairs` takes and how much memory it holds, by input size.

    python bench/pairs.py                                   # 25k, 50k, 100k rows, 3 repeats each
    python bench/pairs.py --rows 25000 100000 --repeats 5 --out bench/results/pairs.json

Rollouts of 8 trajectories per problem (mtdpo.synthetic_rollouts, each assistant turn opening
with a restatement of the question so that a trajectory is 1-2 KB of JSON, as multi-turn agent
output is) are written once per size as 4 generation shards, a problem's rows spread over all
of them. Each run is its own process: the seconds of `make_pairs_file` (reading, pairing,
writing) and the process's peak RSS (ru_maxrss), which stays flat as the row count grows
because the input is streamed through bucket files. Min and median over the repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PER_PROBLEM, SHARDS = 8, 4


def lengthened(row: dict) -> dict:
    """The row with every assistant turn opening with the question restated, as models do."""
    question = next(m["content"] for m in row["messages"] if m["role"] == "user").split("\n")[0]
    messages = [
        dict(m, content=f"We are asked: {question} Let me think about what this needs.\n\n{m['content']}")
        if m["role"] == "assistant"
        else m
        for m in row["messages"]
    ]
    return dict(row, messages=messages)


def write_input(folder: Path, rows: int) -> dict:
    from mtdpo.synthetic_rollouts import make_rollouts

    folder.mkdir(parents=True)
    files = [open(folder / f"shard-{i}.jsonl", "w", encoding="utf-8") for i in range(SHARDS)]
    for n, row in enumerate(make_rollouts(rows // PER_PROBLEM, PER_PROBLEM, seed=1)):
        files[n % SHARDS].write(json.dumps(lengthened(row), ensure_ascii=False) + "\n")
    for f in files:
        f.close()
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {"rows": rows, "input_MB": round(size / 1e6, 1), "bytes_per_row": round(size / rows)}


def worker(rollouts: str, out: str) -> dict:
    from mtdpo.pairs import make_pairs_file

    started = time.perf_counter()
    numbers = make_pairs_file(Path(rollouts), Path(out), overwrite=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "seconds": round(seconds, 3),
        "peak_rss_MiB": round(peak, 1),
        "pairs": numbers["pairs"],
        "problems": numbers["problems"],
    }


def run_once(rollouts: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", str(rollouts), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout)


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "all": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pairs.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    results = {
        "command": " ".join(["python", "bench/pairs.py", *sys.argv[1:]]),
        "commit": commit,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "sizes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            size = write_input(Path(tmp) / f"rollouts-{rows}", rows)
            runs = [
                run_once(Path(tmp) / f"rollouts-{rows}", Path(tmp) / f"pairs-{rows}.jsonl") for _ in range(args.repeats)
            ]
            size.update(
                pairs=runs[0]["pairs"],
                problems=runs[0]["problems"],
                seconds=spread([r["seconds"] for r in runs]),
                peak_rss_MiB=spread([r["peak_rss_MiB"] for r in runs]),
            )
            results["sizes"].append(size)
            print(
                f"{rows:>8,} rows ({size['input_MB']} MB): {size['seconds']['min']:.2f} s min, {size['seconds']['median']:.2f} s median; "
                f"peak RSS {size['peak_rss_MiB']['min']:.0f} MiB min, {size['peak_rss_MiB']['median']:.0f} MiB median",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
