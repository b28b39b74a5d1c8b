"""Stage-one masking speed: rows/s of render + mask + check on the bundled sample.

Times `PairEncoder` alone (no reading, no Arrow writing), in this process, with whatever
`mtdpo` is first on PYTHONPATH, so two versions are compared as two processes run in turn:

    for i in 1 2 3 4 5; do
        PYTHONPATH=/path/to/old python bench/mask_speed.py --label old
        PYTHONPATH=$PWD        python bench/mask_speed.py --label new
    done

Prints one JSON line per run: the best and median rows/s over --repeats passes, and the
template renders per row (counted in one extra, untimed pass).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mtdpo.assets import SAMPLE_DATA
from mtdpo.preprocess.records import MaskOptions, RecordBuilder
from mtdpo.preprocess.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokenizer", default=None, help="default: the embedded tiny tokenizer")
    parser.add_argument("--chat-template", default=None, help="a template file (default: the tokenizer's own)")
    parser.add_argument("--data", default=str(SAMPLE_DATA))
    args = parser.parse_args()
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    encoder = RecordBuilder(load_tokenizer(args.tokenizer, args.chat_template), MaskOptions())
    renders = count_renders(encoder, rows)
    rates = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        encode_all(encoder, rows)
        rates.append(len(rows) / (time.perf_counter() - started))
    print(
        json.dumps(
            {
                "label": args.label,
                "rows": len(rows),
                "best": round(max(rates), 1),
                "median": round(statistics.median(rates), 1),
                "renders_per_row": round(renders / len(rows), 2),
            }
        )
    )


def count_renders(encoder, rows) -> int:
    """Template renders for one pass over the rows (both mask rules render through chat.render)."""
    chat, calls = encoder.chat, [0]
    render = chat.render

    def counting(*args, **kwargs):
        calls[0] += 1
        return render(*args, **kwargs)

    chat.render = counting
    try:
        encode_all(encoder, rows)
    finally:
        del chat.render
    return calls[0]


def encode_all(encoder, rows) -> None:
    for n, row in enumerate(rows):
        try:
            encoder(n, row)
        except ValueError:  # rejected rows cost time too
            pass


if __name__ == "__main__":
    main()
