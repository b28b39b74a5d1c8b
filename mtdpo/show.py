"""Show one cached pair with its mask, from the shards and the tokenizer copy in the cache (or,
for a KTO cache, one row: its one sequence under its label, desirable or undesirable).

Three views of the same model (a pair → sides → turns → tokens):
- a terminal: chosen and rejected side by side (stacked when narrow), trained tokens green,
  masked ones grey, a role label with trained / masked counts at each turn;
- plain text when piped: the exact decoded text, trained runs [[bracketed]], one `▸` label
  line before each turn;
- a standalone HTML page (`--html`) with the same colours, no network, no external assets.
"""

from __future__ import annotations

import html
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from mtdpo.cache import IGNORE_INDEX, KtoRecord, OpenCache, PairRecord, open_cache
from mtdpo.errors import UsageError
from mtdpo.families import Family, detect_family
from mtdpo.turns import token_starts, turn_starts

# One palette for the terminal and the HTML page.
COLORS = {"trained": "#22c55e", "masked": "#8b8b8b", "diverge": "#facc15", "role": "#60a5fa"}
TRAINED = f"bold {COLORS['trained']}"
MASKED = COLORS["masked"]
DIVERGE = f"bold #000000 on {COLORS['diverge']}"
ROLE = f"bold #000000 on {COLORS['role']}"
SIDE_BY_SIDE_WIDTH = 120  # narrower terminals stack chosen above rejected
SUBSCRIPT = str.maketrans("0123456789-", "₀₁₂₃₄₅₆₇₈₉₋")
SEARCH_BATCH = 256


# ── the model ─────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Token:
    position: int
    id: int
    text: str  # this token's share of the decoded text
    trained: bool


@dataclass(frozen=True)
class Turn:
    role: str  # from the template's turn marker; "trained"/"masked" when the family is unknown
    tokens: list[Token]
    sequence: int = 0  # which of its side's sequences (generation contexts) it is in

    @property
    def trained(self) -> int:
        return sum(t.trained for t in self.tokens)

    @property
    def masked(self) -> int:
        return len(self.tokens) - self.trained


@dataclass(frozen=True)
class Side:
    name: str
    turns: list[Turn]
    sequences: int = 1  # a side scored in several generation contexts is several sequences

    @property
    def tokens(self) -> int:
        return sum(len(turn.tokens) for turn in self.turns)

    @property
    def trained(self) -> int:
        return sum(turn.trained for turn in self.turns)


@dataclass(frozen=True)
class PairView:
    index: int
    row: int
    prompt_len: int  # the sides diverge before this token
    family: str | None  # template family the turns were read from (None: trained/masked runs)
    sides: list[Side]
    how: str = ""  # how the pair was picked, when not by --index ("random", "first match for …")
    label: str | None = None  # a KTO row's: "desirable" or "undesirable" (its one side's name)

    @property
    def diverges_at(self) -> int:
        """The token where the sides part (▶); a KTO row has one side: none."""
        return -1 if self.label else self.prompt_len


def build_side(pair: PairRecord | KtoRecord, tokenizer, side: str, family: Family | None) -> Side:
    pieces, offsets = pair.side(side).pieces(), pair.side(side).starts
    turns = [
        turn
        for k, (piece, offset) in enumerate(zip(pieces, offsets))
        for turn in sequence_turns(piece, offset, k, tokenizer, family)
    ]
    return Side(side, turns, len(pieces))


def sequence_turns(piece, offset: int, sequence: int, tokenizer, family: Family | None) -> list[Turn]:
    """The turns of one sequence, its tokens numbered from `offset` (their place in the side)."""
    ids, labels = piece.input_ids, piece.labels
    text, starts = token_starts(tokenizer, ids)
    ends = starts[1:] + [len(text)]
    tokens = [
        Token(offset + n, i, text[start:end], label != IGNORE_INDEX)
        for n, (i, label, start, end) in enumerate(zip(ids, labels, starts, ends))
    ]
    heads = turn_starts(text, starts, family) if family else []
    if not heads:  # unknown family: each run of trained or masked tokens is a "turn"
        heads = [
            (k, "trained" if t.trained else "masked")
            for k, t in enumerate(tokens)
            if k == 0 or t.trained != tokens[k - 1].trained
        ]
    bounds = [first for first, _ in heads[1:]] + [len(tokens)]
    turns = [Turn(role, tokens[first:end], sequence) for (first, role), end in zip(heads, bounds)]
    if family:  # name tool calls and tool results from the turn's text
        roles = [family.turn_role(turn.role, "".join(t.text for t in turn.tokens)) for turn in turns]
        turns = [Turn(role, turn.tokens, sequence) for role, turn in zip(roles, turns)]
    return turns


def sequence_heading(turn: Turn, side: Side) -> str | None:
    """The line that opens each sequence of a side of several (None: the turn opens none)."""
    if side.sequences == 1 or turn is not first_of(side, turn.sequence):
        return None
    return f"sequence {turn.sequence + 1} of {side.sequences}: the turns trained in the context they were generated in"


def first_of(side: Side, sequence: int) -> Turn | None:
    return next((turn for turn in side.turns if turn.sequence == sequence), None)


def build_view(pair: PairRecord | KtoRecord, tokenizer, index: int, sides: list[str], how: str = "") -> PairView:
    label = pair.group if isinstance(pair, KtoRecord) else None
    sides = [label] if label else sides
    family = detect_family(tokenizer.chat_template)
    built = [build_side(pair, tokenizer, side, family) for side in sides]
    has_turns = family is not None and any(
        turn.role not in ("trained", "masked") for side in built for turn in side.turns
    )
    return PairView(index, pair.row, pair.prompt_len, family.name if has_turns else None, built, how, label)


def runs(turn: Turn, prompt_len: int):
    """Consecutive tokens of one turn with the same trained state, split where the sides
    diverge; None stands for the divergence point."""
    run: list[Token] = []
    for token in turn.tokens:
        if token.position == prompt_len:
            if run:
                yield run
            yield None
            run = []
        elif run and token.trained != run[-1].trained:
            yield run
            run = []
        run.append(token)
    if run:
        yield run


def token_label(token: Token) -> str:
    """A token with its id in subscript; newlines (↵) and tabs (→) made visible, and a
    token holding a newline ends its line after its id."""
    return _visible(token.text) + str(token.id).translate(SUBSCRIPT) + ("\n" if "\n" in token.text else "")


def _visible(text: str) -> str:
    return text.replace("\t", "→").replace("\n", "↵")


def run_text(run: list[Token], with_ids: bool) -> str:
    return "".join(token_label(t) if with_ids else t.text for t in run)


# ── picking a pair ────────────────────────────────────────────────────────────


def pick_index(
    cache: OpenCache, tokenizer, index: int | None, search: str | None, pick_random: bool, rng=random
) -> tuple[int, str]:
    """The pair to show and, when not given by --index, how it was found."""
    if pick_random and index is not None:
        raise UsageError("--random picks the pair itself; drop --index")
    if search is not None:
        matches = find_pairs(cache, tokenizer, search, start=index or 0, first_only=not pick_random)
        if not matches:
            where = f" at or after --index {index}" if index else ""
            raise UsageError(f"no {cache.manifest.unit} in {cache.path} contains {search!r}{where}")
        if pick_random:
            return rng.choice(matches), f"random match for {search!r}, 1 of {len(matches)}"
        return matches[0], f"first match for {search!r}"
    if pick_random:
        if len(cache) == 0:
            raise UsageError(f"{cache.path} holds no {cache.manifest.unit}s")
        return rng.randrange(len(cache)), "random"
    index = 0 if index is None else index
    if not 0 <= index < len(cache):
        raise UsageError(f"--index {index} is out of range: {cache.path} holds {len(cache)} {cache.manifest.unit}s")
    return index, ""


def find_pairs(cache: OpenCache, tokenizer, text: str, start: int = 0, first_only: bool = True) -> list[int]:
    """Positions of the pairs whose chosen or rejected text (a KTO row's text) contains `text`, ignoring case."""
    needle, found = text.casefold(), []
    for begin in range(max(start, 0), len(cache), SEARCH_BATCH):
        batch = cache.token_ids_of(begin, begin + SEARCH_BATCH)
        texts = [tokenizer.batch_decode(ids) for ids in batch.values()]  # chosen, rejected; or the one sequence
        for offset, sides in enumerate(zip(*texts)):
            if any(needle in text.casefold() for text in sides):
                found.append(begin + offset)
                if first_only:
                    return found
    return found


# ── JSON ──────────────────────────────────────────────────────────────────────


def pair_as_json(pair: PairRecord | KtoRecord, tokenizer, index: int, sides: list[str]) -> dict:
    """The pair for scripts: per side, `sequences` (one entry per generation context, each with
    its input_ids and labels: the contract an outside checker reads), and the side's tokens laid
    end to end with their decoded text and turns. A KTO row: its one side under "sequence", and
    its "label" (true: desirable)."""
    view = build_view(pair, tokenizer, index, sides)
    out = {"index": index, "row": pair.row, "prompt_len": pair.prompt_len}
    if view.label:
        out["label"] = pair.desirable  # true: desirable
    for side in view.sides:
        sequence = pair.side(side.name)
        ids, labels = sequence.input_ids, sequence.labels
        out["sequence" if view.label else side.name] = {
            "sequences": [{"input_ids": p.input_ids, "labels": p.labels} for p in sequence.pieces()],
            "input_ids": ids,
            "labels": labels,
            "tokens": [tokenizer.decode([i]) for i in ids],
            "turns": [
                {
                    "role": t.role,
                    "sequence": t.sequence,
                    "start": t.tokens[0].position,
                    "tokens": len(t.tokens),
                    "trained": t.trained,
                }
                for t in side.turns
            ],
        }
    return out


# ── plain text (piped) ────────────────────────────────────────────────────────


def plain_text(view: PairView, with_ids: bool = False) -> str:
    """The exact decoded text of each side; trained runs [[bracketed]]; a `▸ role: …` line
    before each turn (on a new line when the turn starts mid-line, as Mistral's do)."""
    out = [_title(view) + "; trained text is [[bracketed]]\n"]
    if view.family is None:
        out.append("turns: template family unknown, each run of trained or masked tokens is shown as one\n")
    for side in view.sides:
        out.append(f"── {_side_title(side)} ──\n")
        for turn in side.turns:
            if not out[-1].endswith("\n"):
                out.append("\n")
            if heading := sequence_heading(turn, side):
                out.append(f"┄┄ {heading} ┄┄\n")
            out.append(f"▸ {_turn_title(turn)}\n")
            for run in runs(turn, view.diverges_at):
                if run is None:
                    out.append("<<diverges here>>")
                else:
                    piece = run_text(run, with_ids)
                    out.append(f"[[{piece}]]" if run[0].trained else piece)
        out.append("\n")
    return "".join(out)


def _title(view: PairView) -> str:
    how = f"; {view.how}" if view.how else ""
    if view.label:
        return f"row {view.index} (source row {view.row}{how}), {view.label}, prompt {view.prompt_len} tokens"
    return f"pair {view.index} (source row {view.row}{how}), shared prompt {view.prompt_len} tokens"


def _side_title(side: Side) -> str:
    sequences = f" in {side.sequences} sequences" if side.sequences > 1 else ""
    return f"{side.name}: {side.tokens} tokens{sequences}, {side.trained} trained, {side.tokens - side.trained} masked"


def _turn_title(turn: Turn) -> str:
    return f"{turn.role}: {turn.trained} trained, {turn.masked} masked"


# ── terminal ──────────────────────────────────────────────────────────────────


def rich_view(view: PairView, width: int, with_ids: bool = False):
    """Chosen and rejected side by side when the terminal is wide enough, else stacked."""
    header = Text(_title(view) + "  ")
    header.append("trained", style=TRAINED).append(" · ").append("masked", style=MASKED)
    if not view.label:
        header.append(" · ").append("▶ diverges", style=DIVERGE)
    if view.family is None:
        header.append(
            "\nturns: template family unknown, each run of trained or masked tokens is shown as one", style="italic"
        )
    sides = [
        (Text(_side_title(side), style="bold"), _rich_side(side, view.diverges_at, with_ids)) for side in view.sides
    ]
    if len(sides) == 2 and width >= SIDE_BY_SIDE_WIDTH:
        table = Table(box=box.SIMPLE_HEAD, expand=True, padding=(0, 1))
        for title, _ in sides:
            table.add_column(title, ratio=1, overflow="fold")
        table.add_row(*(body for _, body in sides))
        return Group(header, table)
    parts: list = [header]
    for title, body in sides:
        parts += [Rule(title, align="left"), body]
    return Group(*parts)


def _rich_side(side: Side, prompt_len: int, with_ids: bool) -> Group:
    blocks = []
    for turn in side.turns:
        if heading := sequence_heading(turn, side):
            blocks.append(Rule(heading, align="left", style="dim"))
        label = Text.assemble((f" {turn.role} ", ROLE), (f" {turn.trained} trained · {turn.masked} masked", "italic"))
        body = Text()
        for run in runs(turn, prompt_len):
            style = None if run is None else TRAINED if run[0].trained else MASKED
            if run is None:
                body.append("▶", style=DIVERGE)
            elif with_ids:  # each token in its colour, its id dim after it
                for token in run:
                    body.append(_visible(token.text), style=style).append(
                        str(token.id).translate(SUBSCRIPT), style="dim"
                    )
                    body.append("\n" if "\n" in token.text else "")
            else:
                body.append(run_text(run, False), style=style)
        if body.plain.endswith("\n"):  # the next label starts a new line anyway
            body.right_crop(1)
        blocks += [label, body]
    return Group(*blocks)


# ── HTML ──────────────────────────────────────────────────────────────────────

CSS = f"""
body {{ background: #111418; color: #e5e7eb; font: 14px/1.45 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; margin: 16px; }}
h1 {{ font-size: 15px; margin: 0 0 4px; }}
.legend span {{ padding: 0 4px; }}
.sides {{ display: grid; grid-template-columns: 1fr 1fr; gap: 20px; margin-top: 12px; }}
@media (max-width: 900px) {{ .sides {{ grid-template-columns: 1fr; }} }}
h2 {{ font-size: 14px; border-bottom: 1px solid #374151; padding-bottom: 4px; }}
.label {{ margin-top: 10px; font-size: 12px; font-style: italic; }}
.role {{ background: {COLORS["role"]}; color: #000; font-weight: bold; font-style: normal; padding: 0 6px; margin-right: 6px; }}
pre {{ white-space: pre-wrap; overflow-wrap: anywhere; margin: 2px 0 0; font: inherit; }}
.trained {{ color: {COLORS["trained"]}; font-weight: bold; }}
.masked {{ color: {COLORS["masked"]}; }}
.diverge {{ background: {COLORS["diverge"]}; color: #000; font-weight: bold; padding: 0 2px; }}
.tok {{ border: 1px solid #374151; border-radius: 3px; margin: 0 1px; }}
.tok sub {{ color: {COLORS["masked"]}; font-weight: normal; font-size: 9px; }}
.note {{ color: {COLORS["masked"]}; font-style: italic; }}
"""


def html_page(view: PairView, with_ids: bool = False) -> str:
    """A standalone page: inline CSS, no script, nothing fetched (a CSP forbids it)."""
    e = html.escape
    sides = "\n".join(_html_side(side, view.diverges_at, with_ids) for side in view.sides)
    note = (
        '<p class="note">turns: template family unknown, each run of trained or masked tokens is shown as one</p>'
        if view.family is None
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mtdpo: {"row" if view.label else "pair"} {view.index}</title>
<style>{CSS}</style></head>
<body>
<h1>{e(_title(view))}</h1>
<p class="legend"><span class="trained">trained</span> <span class="masked">masked</span>{"" if view.label else ' <span class="diverge">▶ diverges</span>'}</p>
{note}
<main class="sides">
{sides}
</main>
</body></html>
"""


def _html_side(side: Side, prompt_len: int, with_ids: bool) -> str:
    e = html.escape
    parts = [f'<section class="side" id="{side.name}"><h2>{e(_side_title(side))}</h2>']
    for turn in side.turns:
        if heading := sequence_heading(turn, side):
            parts.append(f'<h3 class="sequence">{e(heading)}</h3>')
        parts.append(
            f'<div class="turn"><div class="label"><span class="role">{e(turn.role)}</span>{turn.trained} trained · {turn.masked} masked</div><pre>'
        )
        for run in runs(turn, prompt_len):
            if run is None:
                parts.append('<span class="diverge">▶</span>')
                continue
            kind = "trained" if run[0].trained else "masked"
            if with_ids:
                tokens = "".join(
                    f'<span class="tok" title="id {t.id}">{e(_visible(t.text))}<sub>{t.id}</sub></span>'
                    + ("\n" if "\n" in t.text else "")
                    for t in run
                )
                parts.append(f'<span class="{kind}">{tokens}</span>')
            else:
                parts.append(f'<span class="{kind}">{e(run_text(run, False))}</span>')
        parts.append("</pre></div>")
    parts.append("</section>")
    return "".join(parts)


# ── the command ───────────────────────────────────────────────────────────────


def sides_of(side: str) -> list[str]:
    if side not in ("chosen", "rejected", "both"):
        raise UsageError(f"--side must be chosen, rejected or both, not {side!r}")
    return ["chosen", "rejected"] if side == "both" else [side]


def load_view(
    cache: Path, index: int | None, side: str, search: str | None = None, pick_random: bool = False
) -> tuple[PairView, PairRecord | KtoRecord, object]:
    sides = sides_of(side)  # a bad --side is an error before anything is read
    opened = open_cache(cache)
    if opened.is_kto and side != "both":
        raise UsageError(f"{cache} is a KTO cache: a row is one sequence, with its label; drop --side {side}")
    tokenizer = opened.load_tokenizer()
    index, how = pick_index(opened, tokenizer, index, search, pick_random)
    pair = opened.record(index)
    return build_view(pair, tokenizer, index, sides, how), pair, tokenizer


def show_every_pair(cache: Path, side: str, console: Console, as_json: bool, with_ids: bool, picked) -> None:
    if picked:
        raise UsageError("--all shows every pair: drop --index, --search, --random and --html")
    sides = sides_of(side)
    opened = open_cache(cache)
    tokenizer = opened.load_tokenizer()
    for index in range(len(opened)):
        pair = opened.record(index)
        if as_json:
            print(json.dumps(pair_as_json(pair, tokenizer, index, sides), ensure_ascii=False))
        else:
            text = plain_text(build_view(pair, tokenizer, index, sides), with_ids)
            console.print(text, end="", soft_wrap=True, highlight=False, markup=False, emoji=False)


def show_sample(
    cache: Path,
    index: int | None,
    side: str,
    console: Console,
    *,
    search: str | None = None,
    pick_random: bool = False,
    with_ids: bool = False,
    html_file: Path | None = None,
    as_json: bool = False,
    every_pair: bool = False,
) -> None:
    """The pair as JSON (for scripts), an HTML page, a coloured terminal view or plain text when
    piped; with `every_pair`, every pair in cache order (one JSON line each with --json)."""
    if as_json and html_file is not None:
        raise UsageError("--json and --html are exclusive; pick one")
    if every_pair:
        show_every_pair(
            cache, side, console, as_json, with_ids, picked=index is not None or search or pick_random or html_file
        )
        return
    if html_file is not None and not Path(html_file).parent.is_dir():
        raise UsageError(f"--html: folder {Path(html_file).parent} does not exist")
    view, pair, tokenizer = load_view(cache, index, side, search, pick_random)
    if as_json:
        json.dump(pair_as_json(pair, tokenizer, view.index, sides_of(side)), sys.stdout, ensure_ascii=False)
        print()
    elif html_file is not None:
        Path(html_file).write_text(html_page(view, with_ids), encoding="utf-8")
        console.print(
            f"wrote {html_file} ({'row' if view.label else 'pair'} {view.index})", highlight=False, soft_wrap=True
        )
    elif console.is_terminal:
        console.print(rich_view(view, console.width, with_ids))
    else:
        # soft_wrap: never insert line breaks of our own, the text must be shown as it was tokenized
        console.print(plain_text(view, with_ids), end="", soft_wrap=True, highlight=False, markup=False, emoji=False)
