"""Write the bundled rollouts, mtdpo/assets/rollouts.jsonl: 40 problems x 8 graded trajectories.

The input of `mtdpo pairs` for the iterative-round demo and the tests; deterministic, so running
this again rewrites the same bytes (tests/test_pairs.py checks that it does).

    python scripts/make_rollouts.py [--out mtdpo/assets/rollouts.jsonl]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtdpo.synthetic_rollouts import write_rollouts

BUNDLED = Path(__file__).resolve().parent.parent / "mtdpo" / "assets" / "rollouts.jsonl"
PROBLEMS, PER_PROBLEM, SEED = 40, 8, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUNDLED)
    out = parser.parse_args().out
    write_rollouts(out, PROBLEMS, PER_PROBLEM, SEED)
    print(f"wrote {out}: {PROBLEMS} problems x {PER_PROBLEM} trajectories")


if __name__ == "__main__":
    main()
