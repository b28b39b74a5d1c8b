"""Render one cached pair with its mask, from the shards and the tokenizer copy in the cache."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

from rich.console import Console
from rich.text import Text

from mtdpo.cache import load_cache
from mtdpo.errors import UsageError
from mtdpo.preprocess.mask import IGNORE_INDEX

TRAINED, MASKED, DIVERGE = "bold green", "dim", "bold black on yellow"


def load_pair(cache: Path, index: int) -> tuple[dict, object]:
    from transformers import AutoTokenizer

    ds = load_cache(cache)
    if not 0 <= index < len(ds):
        raise UsageError(f"--index {index} is out of range: {cache} holds {len(ds)} pairs")
    return ds[index], AutoTokenizer.from_pretrained(str(Path(cache) / "tokenizer"))


def pair_as_json(pair: dict, tokenizer, index: int, sides: list[str]) -> dict:
    out = {"index": index, "row": pair["row"], "prompt_len": pair["prompt_len"]}
    for side in sides:
        ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
        out[side] = {"input_ids": ids, "labels": labels, "tokens": [tokenizer.decode([i]) for i in ids]}
    return out


def render_side(pair: dict, tokenizer, side: str, plain: bool) -> Text:
    """Text of one side, trained runs highlighted (or [[bracketed]] when plain)."""
    ids, labels, prompt_len = pair[f"{side}_input_ids"], pair[f"{side}_labels"], pair["prompt_len"]
    trained = sum(label != IGNORE_INDEX for label in labels)
    text = Text()
    text.append(f"── {side}: {len(ids)} tokens, {trained} trained, {len(ids) - trained} masked ──\n", style="bold")
    for position, run in _runs(ids, labels, prompt_len):
        if position == prompt_len and prompt_len < len(ids):
            text.append("<<diverges here>>" if plain else "▶ diverges ", style=DIVERGE)
        piece = tokenizer.decode([i for i, _ in run])
        is_trained = run[0][1] != IGNORE_INDEX
        if plain:
            text.append(f"[[{piece}]]" if is_trained else piece)
        else:
            text.append(piece, style=TRAINED if is_trained else MASKED)
    text.append("\n")
    return text


def _runs(ids, labels, split_at):
    """Consecutive tokens with the same trained state, also split at the divergence point."""
    position = 0
    keyed = ((i, label, label != IGNORE_INDEX, n >= split_at) for n, (i, label) in enumerate(zip(ids, labels)))
    for _, group in groupby(keyed, key=lambda t: (t[2], t[3])):
        run = [(i, label) for i, label, _, _ in group]
        yield position, run
        position += len(run)


def show_sample(cache: Path, index: int, side: str, console: Console) -> None:
    sides = sides_of(side)  # a bad --side is an error before anything is printed
    pair, tokenizer = load_pair(cache, index)
    plain = not console.is_terminal
    header = Text(f"pair {index} (source row {pair['row']}), shared prompt {pair['prompt_len']} tokens; ")
    if plain:
        header.append("trained text is [[bracketed]]")
    else:
        header.append("trained", style=TRAINED).append(" / ").append("masked", style=MASKED)
    # soft_wrap: never insert line breaks of our own, the text must be shown as it was tokenized
    console.print(header, soft_wrap=True)
    for name in sides:
        console.print(render_side(pair, tokenizer, name, plain), end="", soft_wrap=True)


def sides_of(side: str) -> list[str]:
    if side not in ("chosen", "rejected", "both"):
        raise UsageError(f"--side must be chosen, rejected or both, not {side!r}")
    return ["chosen", "rejected"] if side == "both" else [side]
