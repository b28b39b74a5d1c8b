"""Write the bundled rollouts: 40 problems x 8 graded trajectories per file.

mtdpo/assets/rollouts.jsonl (seed 0) is the input of `mtdpo pairs` for round 1 of the
iterative-round demo and the tests; mtdpo/assets/rollouts-round2.jsonl (seed 1: other problems,
as each round of the paper samples a new prompt set) stands for the round-1 model's rollouts in
round 2 (docs/ITERATIVE.md). Deterministic, so running this again rewrites the same bytes
(tests/test_pairs.py checks that it does).

    python scripts/make_rollouts.py [--out mtdpo/assets/rollouts.jsonl] [--seed 0]
    python scripts/make_rollouts.py --out mtdpo/assets/rollouts-round2.jsonl --seed 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtdpo.synthetic_rollouts import write_rollouts

BUNDLED = Path(__file__).resolve().parent.parent / "mtdpo" / "assets" / "rollouts.jsonl"
PROBLEMS, PER_PROBLEM, SEED = 40, 8, 0
ROUND2_SEED = 1  # mtdpo/assets/rollouts-round2.jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUNDLED)
    parser.add_argument("--seed", type=int, default=SEED, help=f"0: round 1's file; {ROUND2_SEED}: round 2's")
    args = parser.parse_args()
    write_rollouts(args.out, PROBLEMS, PER_PROBLEM, args.seed)
    print(f"wrote {args.out}: {PROBLEMS} problems x {PER_PROBLEM} trajectories (seed {args.seed})")


if __name__ == "__main__":
    main()
