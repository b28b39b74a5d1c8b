"""Print what each template family trains on one multi-turn pair: the blocks of docs/MASKING.md.

    .venv/bin/python scripts/masking_examples.py

Each family's tokenizer is the one the tests use (tests/conftest.py: the embedded byte-level BPE
with the family's special tokens and real chat template from tests/templates/). The text is
`mtdpo show-sample`'s plain view of the chosen side: trained text [[bracketed]], a `▸ role`
line before each turn. tests/test_docs.py checks that docs/MASKING.md quotes these blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import family_tokenizer, for_family, msg  # noqa: E402

from mtdpo.preprocess.encode import MaskOptions, PairEncoder  # noqa: E402
from mtdpo.show import build_view, plain_text  # noqa: E402

FAMILIES = ["gemma", "llama3", "qwen2", "mistral", "phi3"]
QUESTION = msg("user", "What is 17 * 23 + 5?")
PAIR = {
    "chosen": [
        QUESTION,
        msg("assistant", "Let me compute it.\n```python\nprint(17 * 23 + 5)\n```"),
        msg("tool", "```output\n396\n```"),
        msg("assistant", "The answer is \\boxed{396}."),
    ],
    "rejected": [QUESTION, msg("assistant", "By hand: 17 * 23 = 381, so \\boxed{386}.")],
}


def example(family: str) -> str:
    tok = family_tokenizer(family)
    record, _ = PairEncoder(tok, MaskOptions())(for_family(PAIR, family))
    text = plain_text(build_view({**record, "row": 0}, tok, 0, ["chosen"]))
    return text.split("\n", 1)[1].rstrip("\n")  # without the "pair 0 (source row 0) …" title


def main() -> None:
    for family in FAMILIES:
        print(f"### {family}\n\n````\n{example(family)}\n````\n")


if __name__ == "__main__":
    main()
