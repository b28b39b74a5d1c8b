"""Train the embedded tiny Gemma-style tokenizer (byte-level BPE, 2048 tokens) and save it.

    python scripts/build_tokenizer.py             # -> mtdpo/assets/tokenizer/

Byte-level, so any text round-trips with no <unk>; Gemma's special tokens and chat template,
so the offline default exercises the same masking path as the real Gemma models. Deterministic:
the corpus comes from fixed seeds and the BPE trainer is deterministic for a given corpus.
"""

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from mtdpo.synthetic import make_pairs  # noqa: E402

VOCAB_SIZE = 2048
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0..5

# Gemma's format. System text is prepended to the next turn (as Gemma 3 does); tool/observation
# turns render as user turns (the original Gemma math-agent data put execution output in a user
# turn); content is trimmed, as Gemma's template does.
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- set ns = namespace(system='') -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + message['content'] | trim + '\\n\\n' -%}\n"
    "{%- else -%}{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = 'user' -%}{%- endif -%}\n"
    "{{ '<start_of_turn>' + role + '\\n' + ns.system + message['content'] | trim + '<end_of_turn>\\n' }}{%- set ns.system = '' -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

WORDS = (
    "the a of to and in is that for it as with was on be by this are from or have an they which one you "
    "were all we when there can more if no out so said what up its about into than them only some could "
    "time two may first then do any like my now over such our man me even most made after also did many "
    "model train data loss token sequence batch gradient learning rate step epoch reward policy reference "
    "number value answer question problem solution equation function integer prime divisor sum product"
).split()
MATH = [
    "x^2 + y^2 = r^2",
    "\\frac{a}{b} + \\frac{c}{d}",
    "\\sqrt{2} \\approx 1.4142",
    "e^{i\\pi} + 1 = 0",
    "\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}",
    "a \\cdot b \\le |a||b|",
    "f'(x) = 2x",
    "\\binom{n}{k}",
    "π ≈ 3.14159",
    "∀ε > 0 ∃δ > 0",
    "x ∈ ℝ",
    "½ + ¼ = ¾",
    "α + β = γ",
    "≠ ≤ ≥ ∞ √ ∑ ∫",
]
CODE = [
    "def f(x):\n    return x * x\n",
    "for i in range(10):\n    print(i)\n",
    "import numpy as np\n",
    "if n % 2 == 0:\n    n //= 2\nelse:\n    n = 3 * n + 1\n",
    "while a != b:\n\ta, b = b, a % b\n",
    "xs = [k for k in range(100) if k % 3 == 0]\n",
    'print(f"{value:.2f}")\n',
    "class Point:\n    pass\n",
    "try:\n    x = 1 / 0\nexcept ZeroDivisionError as e:\n    print(e)\n",
    "return {'key': [1, 2, 3]}\n",
]
OTHER = [
    "Café naïve résumé façade coöperate",
    "Grüße aus München",
    "日本語のテキスト",
    "Привет, мир",
    "emoji 🙂🚀",
    "tabs\tand  double  spaces",
    "C:\\path\\to\\file.txt",
    "https://example.com/a?b=1&c=2",
]


def generic_text(n: int, seed: int) -> list[str]:
    """Plain English, LaTeX, Python and a sprinkling of other scripts, so merges are not all maths-agent."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        sentence = " ".join(r.choice(WORDS) for _ in range(r.randint(5, 20)))
        out.append(sentence.capitalize() + r.choice([".", "?", "!", ":", ";"]))
        out.append(f"Let ${r.choice(MATH)}$ where $n = {r.randint(0, 10 ** r.randint(1, 6))}$.")
        out.append(r.choice(CODE) + "\n" + r.choice(OTHER))
    return out


def corpus() -> list[str]:
    texts = [m["content"] for row in make_pairs(5000, seed=1) for side in ("chosen", "rejected") for m in row[side]]
    # The rendered frame (role headers and newlines around special tokens) should merge too.
    texts += ["user\n", "model\n", "\n\n"] * 200
    return texts + generic_text(3000, seed=2)


def build() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())  # byte-level: every byte is in the vocab, so no unk is ever needed
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # trim_offsets=False: offsets tile the text exactly (a leading space stays in its token's span),
    # as in Llama-3/Qwen2 tokenizers, so every character maps to exactly one token.
    # Then prepend <bos> with add_special_tokens=True, as Gemma's tokenizer does.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        model_max_length=8192,
        chat_template=CHAT_TEMPLATE,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "mtdpo/assets/tokenizer")
    args = ap.parse_args()
    tok = build()
    assert [tok.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    tok.save_pretrained(args.out)
    print(f"saved tokenizer ({len(tok)} tokens) to {args.out}")


if __name__ == "__main__":
    main()
