"""Save the tiny random Gemma model `mtdpo train` starts from with no --model (seeded), with the
embedded tokenizer, so that a later run can name it: the "SFT model" of the iterative-round demo
(docs/ITERATIVE.md), the policy start of round 1 and the fixed reference of a KL-regularized round 2.

    python scripts/save_start_model.py runs/iterate/sft [--seed 42]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import set_seed
from transformers.utils import logging as transformers_logging

from mtdpo.assets import EMBEDDED_TOKENIZER
from mtdpo.train.model import load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=42, help="the seed `mtdpo train --seed` would draw it with")
    args = parser.parse_args()
    set_seed(args.seed)
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar in the demo's output
    load_policy(None, "sdpa", torch.float32, False).save_pretrained(args.out)
    shutil.copytree(EMBEDDED_TOKENIZER, args.out, dirs_exist_ok=True)  # so train's tokenizer check passes
    print(f"saved the tiny random model of seed {args.seed} with the embedded tokenizer to {args.out}")


if __name__ == "__main__":
    main()
