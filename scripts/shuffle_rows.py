"""Shuffle the lines of a JSON-lines file with a fixed seed (the same output for the same input).

KTO's reference point pairs each row with its neighbour's completion (TRL's rule: the previous row
in the file, within chunks of the per-device batch size; docs/ITERATIVE.md), and `mtdpo pairs --kto`
writes a problem's desirable and undesirable rows side by side. Shuffled, a row's neighbour answers
another problem, as the KL estimate assumes; the paper's KTO script shuffles its rows the same way
(`dataset.shuffle(seed=42)`). Reads the whole file: for large files use `shuf` or `datasets`.

    python scripts/shuffle_rows.py IN.jsonl OUT.jsonl [--seed 42]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def shuffled(lines: list[str], seed: int) -> list[str]:
    lines = list(lines)
    random.Random(seed).shuffle(lines)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    lines = [line for line in args.input.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    args.out.write_text("".join(shuffled(lines, args.seed)), encoding="utf-8")
    print(f"shuffled {len(lines)} rows of {args.input} with seed {args.seed} into {args.out}")


if __name__ == "__main__":
    main()
