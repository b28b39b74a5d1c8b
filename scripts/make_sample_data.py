"""Write synthetic math-agent preference pairs as JSON lines (the embedded sample by default).

python scripts/make_sample_data.py                          # -> mtdpo/assets/sample.jsonl (240 pairs)
python scripts/make_sample_data.py --n 200 --tool-role user --out data/gemma-train.jsonl
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package


def main() -> None:
    from mtdpo.synthetic import make_pairs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=240, help="number of preference pairs (default: 240)")
    ap.add_argument("--seed", type=int, default=0, help="the same seed gives the same rows (default: 0)")
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "mtdpo/assets/sample.jsonl",
        help="file to write (default: the embedded sample)",
    )
    ap.add_argument(
        "--tool-role",
        default="tool",
        choices=("tool", "user"),
        help="role of the code-execution output turns (default: tool); 'user' for templates with no tool role, such as Gemma's",
    )
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in make_pairs(args.n, args.seed):
            if args.tool_role != "tool":
                row = {
                    side: [dict(m, role=args.tool_role) if m["role"] == "tool" else m for m in row[side]]
                    for side in ("chosen", "rejected")
                }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {args.n} pairs to {args.out}")


if __name__ == "__main__":
    main()
