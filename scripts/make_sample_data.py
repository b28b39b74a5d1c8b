"""Write the embedded sample dataset: synthetic math-agent preference pairs as JSON lines.

    python scripts/make_sample_data.py            # -> mtdpo/assets/sample.jsonl (240 pairs)
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from mtdpo.synthetic import write_jsonl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=240, help="number of preference pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "mtdpo/assets/sample.jsonl")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out, args.n, args.seed)
    print(f"wrote {args.n} pairs to {args.out}")


if __name__ == "__main__":
    main()
