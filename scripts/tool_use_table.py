"""Rows kept and rejected per chat-template family on a generated tool-use set, with the reasons.

    .venv/bin/python scripts/tool_use_table.py            # markdown, as in docs/MASKING.md
    .venv/bin/python scripts/tool_use_table.py --rows 140 --style openai
    .venv/bin/python scripts/tool_use_table.py --style openai --tools-as-text   # the templates without tools

The set is `mtdpo.synthetic.make_tool_pairs` (7 shapes in turn: call-only turn, content + call,
two calls in one turn, two rounds, reasoning, second user turn, text parts). Each family's
tokenizer is the one the tests build (tests/templates, real templates). `--style native` writes
each row as its family's template expects it (DeepSeek-V3: call-only content null and arguments
as a JSON string; families without a tool role: tool results as user turns); `--style openai`
writes every row the OpenAI way (content null, arguments as JSON strings), unchanged.
`--tools-as-text` preprocesses with that option, for the families whose template has no tool support.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from helpers import FAMILIES, family_tokenizer  # noqa: E402

from mtdpo.preprocess.records import MaskOptions, RecordBuilder  # noqa: E402
from mtdpo.preprocess.rows import RowError  # noqa: E402
from mtdpo.synthetic import TOOL_SHAPES, make_tool_pairs  # noqa: E402

ORDER = ["gemma", "llama3", "qwen2", "mistral", "phi3", "qwen3", "mistral3", "deepseek3"]
WITHOUT_TOOLS = ["gemma", "mistral", "phi3"]  # templates that never name a tool


def restyle(row: dict, family: str, style: str) -> dict:
    openai = style == "openai" or family == "deepseek3"
    tool_role = "tool" if style == "openai" else FAMILIES[family]["tool_role"] or "user"
    out = dict(row)
    for side in ("chosen", "rejected"):
        out[side] = [_message(m, openai, tool_role) for m in row[side]]
    return out


def _message(m: dict, openai: bool, tool_role: str) -> dict:
    m = dict(m, role=tool_role) if m["role"] == "tool" else dict(m)
    if openai and m.get("tool_calls"):
        m["content"] = m["content"] or None
        m["tool_calls"] = [
            dict(c, function=dict(c["function"], arguments=json.dumps(c["function"]["arguments"])))
            for c in m["tool_calls"]
        ]
    return m


def family_counts(family: str, rows: list[dict], style: str, tools_as_text: bool = False) -> dict:
    encoder = RecordBuilder(family_tokenizer(family), MaskOptions(max_length=1 << 20, tools_as_text=tools_as_text))
    kept, reasons, by_shape = 0, Counter(), Counter()
    for row in rows:
        try:
            encoder(0, restyle(row, family, style))
            kept += 1
            by_shape[row["shape"]] += 1
        except RowError as err:
            reasons[re.sub(r"message \d+", "message N", str(err))] += 1
    return {"kept": kept, "rejected": len(rows) - kept, "reasons": reasons, "kept_by_shape": by_shape}


def markdown(rows: int, style: str, tools_as_text: bool = False) -> str:
    data = list(make_tool_pairs(rows))
    per_shape = Counter(row["shape"] for row in data)
    lines = [
        f"| family | kept | rejected | kept per shape ({', '.join(f'{s}: {per_shape[s]}' for s in TOOL_SHAPES)}) | why rejected (rows) |",
        "|---|---|---|---|---|",
    ]
    for family in WITHOUT_TOOLS if tools_as_text else ORDER:
        c = family_counts(family, data, style, tools_as_text)
        shapes = ", ".join(f"{s} {c['kept_by_shape'][s]}" for s in TOOL_SHAPES)
        why = "<br>".join(f"{n} × `{reason}`" for reason, n in c["reasons"].most_common()).replace("|", "\\|") or "-"
        lines.append(f"| {family} | {c['kept']} | {c['rejected']} | {shapes} | {why} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=70)
    parser.add_argument("--style", choices=["native", "openai"], default="native")
    parser.add_argument("--tools-as-text", action="store_true", help="preprocess with --tools-as-text")
    args = parser.parse_args()
    print(markdown(args.rows, args.style, args.tools_as_text))


if __name__ == "__main__":
    main()
