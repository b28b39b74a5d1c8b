"""Encode benchmark pairs with PairEncoder, for instruction counts that do not drift with the host.

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.base python bench/pair_instructions.py --pairs 0
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.run python bench/pair_instructions.py --pairs 350

Instructions per pair = (total of the run - total of the --pairs 0 baseline) / pairs. Both
runs first encode the same 50 warm-up pairs of the --prep benchmark's rows (written here with
bench/run.py's write_rows when they are not there yet), under a fixed hash seed (with a random
one the count moves by up to ~0.5 %). `--reuse-min-share` overrides
`mtdpo.preprocess.tokens.REUSE_MIN_SHARE` (a huge value reuses every shared prefix, as before
commit ce2fc61). The embedded tokenizer unless --tokenizer is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from run import WORK, write_rows  # bench/run.py: the --prep rows

WARM_UP = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=Path, default=WORK / "prep-2000.jsonl")
    parser.add_argument("--pairs", type=int, default=350, help="pairs encoded after the warm-up")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--reuse-min-share", type=int, default=None)
    args = parser.parse_args()

    import mtdpo.preprocess.tokens as tokens
    from mtdpo.preprocess.records import MaskOptions, RecordBuilder
    from mtdpo.preprocess.tokenizer import load_tokenizer

    if args.reuse_min_share is not None:
        tokens.REUSE_MIN_SHARE = args.reuse_min_share
    encoder = RecordBuilder(load_tokenizer(args.tokenizer), MaskOptions())
    with open(write_rows(args.rows, 2000)) as f:
        rows = [json.loads(line) for _, line in zip(range(WARM_UP + args.pairs), f)]
    for n, row in enumerate(rows):
        encoder(n, row)


if __name__ == "__main__":
    main()
