"""Stage one's tokenizer: loaded with its chat template (or one given), checked to compile.

Stage two never loads a tokenizer: it compares fingerprints (mtdpo/fingerprint.py) and copies
the cache's tokenizer files next to the trained model.
"""

from __future__ import annotations

from pathlib import Path

from mtdpo import hub
from mtdpo.assets import EMBEDDED_TOKENIZER, chat_template_file, packaged_templates
from mtdpo.errors import UsageError


def load_tokenizer(name_or_path: str | None = None, chat_template: Path | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = str(name_or_path or EMBEDDED_TOKENIZER)
    offline = hub.unreachable() if hub.looks_like_hub_name(source) else None  # then only the hub cache is asked
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=bool(offline)
        )
    except Exception as err:
        if offline:
            raise hub.no_network("tokenizer", source, offline) from None
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise UsageError(f"tokenizer not found or not loadable: {source} ({reason})") from None
    if not tokenizer.is_fast:
        raise UsageError(f"{source} has no fast tokenizer; mtdpo needs character offsets to find assistant spans")
    if chat_template is not None:
        tokenizer.chat_template = chat_template_file(chat_template).read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise UsageError(
            f"{source} has no chat template; pass one with --chat-template FILE or NAME ({', '.join(packaged_templates())})"
        )
    check_template_compiles(tokenizer, chat_template or source)
    return tokenizer


def check_template_compiles(tokenizer, where) -> None:
    """A template with a syntax error would reject every row one by one: say it once, up front."""
    from jinja2 import TemplateSyntaxError

    from mtdpo.preprocess.template import compile_template  # compiled once: the masking code reuses it

    try:
        compile_template(tokenizer.chat_template)
    except TemplateSyntaxError as err:
        raise UsageError(f"the chat template of {where} does not compile: {err.message} (line {err.lineno})") from None
