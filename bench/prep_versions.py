"""Two mtdpo checkouts' `mtdpo preprocess` on the same rows, each run its own process, interleaved.

    python bench/prep_versions.py --old /path/to/old/checkout --new . --repeats 5

Inputs: synthetic math-agent pairs (mtdpo/synthetic.py make_pairs) through the embedded tokenizer
and through the Qwen2.5 family tokenizer of tests/templates (prefix-stable data: the cache is one
sequence per side), and, for the new checkout only, Qwen3 rows with a follow-up question, whose
first turns are scored in their own generation contexts (the cost of sides of several sequences),
beside the same rows through Qwen2.5. Rows/s is stats.json's (the pipeline's own clock: tokenizer
load through the last shard written), one process per run; min and median over the repeats.
Writes bench/results/prep-versions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tokenizers(work: Path) -> dict[str, str | None]:
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from helpers import family_tokenizer

    saved = {"embedded": None}
    for family in ("qwen2", "qwen3"):
        path = work / f"tok-{family}"
        family_tokenizer(family).save_pretrained(str(path))
        saved[family] = str(path)
    return saved


def rows(work: Path, n: int) -> dict[str, Path]:
    from mtdpo.synthetic import make_pairs

    plain = work / "pairs.jsonl"
    with open(plain, "w") as f:
        for row in make_pairs(n, seed=11):
            f.write(json.dumps(row) + "\n")
    follow = work / "follow-up.jsonl"
    with open(follow, "w") as f:
        for k, row in enumerate(make_pairs(n, seed=12)):
            extra = [
                {"role": "user", "content": "Check it once more."},
                {"role": "assistant", "content": f"Checked: {k}."},
            ]
            sides = {side: [m for m in row[side] if m["role"] != "tool"] + extra for side in ("chosen", "rejected")}
            f.write(json.dumps(sides) + "\n")
    return {"pairs": plain, "follow-up": follow}


def run(tree: Path, rows_file: Path, tokenizer: str | None, out: Path) -> float:
    command = [sys.executable, "-m", "mtdpo", "preprocess", str(rows_file), "--out", str(out), "--overwrite", "-q"]
    if tokenizer:
        command += ["--tokenizer", tokenizer]
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, env=env, check=True, capture_output=True)
    return json.loads((out / "stats.json").read_text())["rows_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=REPO)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        toks, inputs = tokenizers(work), rows(work, args.rows)
        cells = [
            ("old", "pairs", "embedded"),
            ("new", "pairs", "embedded"),
            ("old", "pairs", "qwen2"),
            ("new", "pairs", "qwen2"),
        ]
        cells += [("new", "follow-up", "qwen2"), ("new", "follow-up", "qwen3")]
        results = {f"{tree} {data} {tok}": [] for tree, data, tok in cells}
        for repeat in range(args.repeats):
            for tree, data, tok in cells[repeat % 2 :] + cells[: repeat % 2]:  # alternate who goes first
                rate = run(getattr(args, tree), inputs[data], toks[tok], work / "cache")
                results[f"{tree} {data} {tok}"].append(rate)
                print(f"repeat {repeat}: {tree} {data} {tok}: {rate:,.1f} rows/s", flush=True)
    summary = {name: {"min": min(v), "median": statistics.median(v), "runs": v} for name, v in results.items()}
    for name, s in summary.items():
        print(f"{name:28s} min {s['min']:8,.1f}  median {s['median']:8,.1f} rows/s")
    out = REPO / "bench" / "results" / "prep-versions.json"
    out.write_text(
        json.dumps({"rows": args.rows, "repeats": args.repeats, "old": str(args.old), "results": summary}, indent=2)
        + "\n"
    )
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
