"""Files that ship inside the package: the embedded tokenizer, the tiny model's config, the
sample data and real chat templates for checkpoints that come without one (a GGUF file has none)."""

from __future__ import annotations

from pathlib import Path

from mtdpo.errors import UsageError

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_TOKENIZER = ASSETS / "tokenizer"  # the tiny Gemma-style byte-level BPE (the default)
SAMPLE_DATA = ASSETS / "sample.jsonl"  # 240 math-agent pairs
ROLLOUTS = ASSETS / "rollouts.jsonl"  # graded rollouts, 40 problems x 8 (the input of `mtdpo pairs`; round 1)
ROLLOUTS_ROUND2 = ASSETS / "rollouts-round2.jsonl"  # the same problems, another seed: round 2 (docs/ITERATIVE.md)
TINY_MODEL = ASSETS / "tiny-gemma"  # config.json of a 0.5M-parameter Gemma sized to the embedded tokenizer
TEMPLATES = ASSETS / "templates"  # `--chat-template gemma3` picks templates/gemma3.jinja


def packaged_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def chat_template_file(value: str | Path) -> Path:
    """A template file, or the packaged template of that name (a file of the name wins)."""
    path = Path(value)
    if path.is_file():
        return path
    if path.name == str(value) and (TEMPLATES / f"{value}.jinja").is_file():
        return TEMPLATES / f"{value}.jinja"
    raise UsageError(
        f"chat template not found: {value} is neither a file nor a packaged template ({', '.join(packaged_templates())})"
    )
