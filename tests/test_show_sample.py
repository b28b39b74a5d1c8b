"""`mtdpo show-sample`: the plain, --tokens, --json, terminal and --html views of a cached
pair, and the turns and roles read back from the cache alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import datasets
import pytest
from helpers import (
    FAMILIES,
    IGNORE,
    RowEncoder,
    assert_user_error,
    decoded_runs,
    embedded_tokenizer,
    family_tokenizer,
    for_family,
    invoke,
    math_agent_pairs,
    n_prompt_messages,
    sample_rows,
    with_template,
)

from mtdpo import show
from mtdpo.cache import PairRecord, open_cache
from mtdpo.preprocess.records import MaskOptions
from mtdpo.turns import token_starts

REPO = Path(__file__).resolve().parents[1]
INDEX = 3  # a sample pair with several assistant turns on both sides


def test_show_sample_plain_brackets_the_trained_text(cli_cache):
    result = invoke("show-sample", cli_cache, "--index", INDEX)
    assert result.exit_code == 0, result.output
    text = result.stdout
    record = datasets.load_from_disk(str(cli_cache))[INDEX]
    row = sample_rows()[record["row"]]
    assert text.startswith(
        f"pair {INDEX} (source row {record['row']}), shared prompt {record['prompt_len']} tokens; trained text is [[bracketed]]\n"
    )
    assert text.count("<<diverges here>>") == 2  # once per side
    chosen, rejected = text.split("── rejected: ")
    # The last assistant turn of each side comes after the divergence: one whole bracketed run,
    # exactly as written (no line breaks added by the terminal width).
    assert f"[[{row['chosen'][-1]['content']}<end_of_turn>]]\n" in chosen
    assert f"[[{row['rejected'][-1]['content']}<end_of_turn>]]\n" in rejected
    # Tool output is shown but never bracketed.
    tool = next(m["content"] for m in row["chosen"] if m["role"] == "tool")
    assert f"<start_of_turn>user\n{tool}<end_of_turn>" in chosen
    # Without brackets and the marker, each side is the whole decoded conversation.
    tok = embedded_tokenizer()
    for side, shown in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
        n_trained = sum(label != IGNORE for label in labels)
        header, body = shown.split("──\n", 1) if side == "chosen" else ("── rejected: " + shown).split("──\n", 1)
        assert header.endswith(f"{side}: {len(ids)} tokens, {n_trained} trained, {len(ids) - n_trained} masked ")
        # Gemma's turns start on a new line, so the `▸ role` label lines are the only text added.
        plain = "".join(line for line in body.splitlines(keepends=True) if not line.startswith("▸ "))
        plain = plain.replace("[[", "").replace("]]", "").replace("<<diverges here>>", "")
        assert plain == tok.decode(ids) + "\n"
        # and the bracketed pieces are the trained runs (split once more where the sides diverge).
        assert "".join(re.findall(r"\[\[(.*?)\]\]", body, flags=re.S)) == "".join(decoded_runs(tok, ids, labels))


def test_show_sample_one_side(cli_cache):
    result = invoke("show-sample", cli_cache, "--index", INDEX, "--side", "rejected")
    assert result.exit_code == 0
    assert "── rejected: " in result.stdout and "── chosen: " not in result.stdout


def test_show_sample_json_matches_the_cache(cli_cache):
    result = invoke("show-sample", cli_cache, "--index", INDEX, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    record = datasets.load_from_disk(str(cli_cache))[INDEX]
    tok = embedded_tokenizer()
    assert (shown["index"], shown["row"], shown["prompt_len"]) == (INDEX, record["row"], record["prompt_len"])
    for side in ("chosen", "rejected"):
        assert shown[side]["input_ids"] == record[f"{side}_input_ids"]
        assert shown[side]["labels"] == record[f"{side}_labels"]
        assert shown[side]["tokens"] == [tok.decode([i]) for i in record[f"{side}_input_ids"]]
        assert "".join(shown[side]["tokens"]) == tok.decode(record[f"{side}_input_ids"])

    one = json.loads(invoke("show-sample", cli_cache, "-i", INDEX, "--side", "chosen", "--json").stdout)
    assert set(one) == {"index", "row", "prompt_len", "chosen"}


# ── turns, roles and counts, read back from the cache alone ─────────────────────

# Roles of the chosen side of "shared_code_and_tool_exchange" as each real template renders them
# (tool turns: Llama-3 ipython, Qwen <tool_response> inside a user turn, others a user turn;
# Llama-3.1 and Qwen2.5 add a system turn of their own), and the family each is read as.
FAMILY_TURNS = {
    "gemma": ("gemma", ["user", "model", "user", "model", "user", "model"]),
    "llama3": ("llama3", ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]),  # ipython turns
    "qwen2": (
        "chatml",
        ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"],
    ),  # user + <tool_response>
    "mistral": ("mistral", ["user", "assistant", "user", "assistant", "user", "assistant"]),
    "phi3": ("phi3", ["user", "assistant", "user", "assistant", "user", "assistant"]),
}
TURN_HEADER = {  # what each turn's text starts with, after BOS (and Mistral's leading space)
    "gemma": "<start_of_turn>{}\n",
    "llama3": "<|start_header_id|>{}<|end_header_id|>",
    "qwen2": "<|im_start|>{}\n",
    "mistral": "{}",
    "phi3": "<|{}|>",
}
MISTRAL_MARKER = {"user": "[INST]", "assistant": "[/INST]"}
TOOL_HEADER = {"llama3": "ipython", "qwen2": "user"}  # the header of a turn shown as "tool"


def cached_record(tok, row: dict) -> dict:
    record, truncated = RowEncoder(tok, MaskOptions())(row)
    assert not truncated
    return {**record, "row": 0}


@pytest.mark.parametrize("family", list(FAMILY_TURNS))
def test_turns_and_roles_come_from_the_template_markers(family):
    tok = family_tokenizer(family)
    row = for_family(math_agent_pairs()["shared_code_and_tool_exchange"], family)
    record = cached_record(tok, row)
    view = show.build_view(PairRecord.from_row(record), tok, 0, ["chosen", "rejected"])
    name, roles = FAMILY_TURNS[family]
    assert view.family == name
    chosen = view.sides[0]
    assert [turn.role for turn in chosen.turns] == roles
    ids, labels = record["chosen_input_ids"], record["chosen_labels"]
    # The turns partition the tokens, in order, and their text is the whole decoded conversation.
    assert [t.position for turn in chosen.turns for t in turn.tokens] == list(range(len(ids)))
    assert "".join(t.text for turn in chosen.turns for t in turn.tokens) == tok.decode(ids)
    bos = FAMILIES[family]["bos_token"] or ""
    for k, turn in enumerate(chosen.turns):
        text = "".join(t.text for t in turn.tokens)
        text = text.removeprefix(bos) if k == 0 else text
        header = (
            MISTRAL_MARKER[turn.role]
            if family == "mistral"
            else TOOL_HEADER[family]
            if turn.role == "tool"
            else turn.role
        )
        assert text.lstrip(" ").startswith(TURN_HEADER[family].format(header)), (k, text)
    # Exactly the assistant turns after the shared prompt hold trained tokens: the message and its
    # end-of-turn marker (Mistral: with the space after [/INST]).
    n_prompt = n_prompt_messages(row)
    lead = " " if family == "mistral" else ""
    eot = FAMILIES[family]["end_of_turn"]
    expected = [lead + m["content"] + eot for m in row["chosen"][n_prompt:] if m["role"] == "assistant"]
    trained_turns = [turn for turn in chosen.turns if turn.trained]
    assert ["".join(t.text for t in turn.tokens if t.trained) for turn in trained_turns] == expected
    assert {turn.role for turn in trained_turns} == {roles[-1]}
    assert all(turn.trained + turn.masked == len(turn.tokens) for turn in chosen.turns)
    assert (chosen.tokens, chosen.trained) == (len(ids), sum(label != IGNORE for label in labels))


def test_mistral_turns_starting_mid_line_get_their_label_on_a_new_line():
    tok = family_tokenizer("mistral")
    record = cached_record(tok, for_family(math_agent_pairs()["diverge_at_last_assistant"], "mistral"))
    text = show.plain_text(show.build_view(PairRecord.from_row(record), tok, 0, ["rejected"]))
    assert "``` [/INST]" not in text  # the turn boundary sits between them
    assert "```\n▸ assistant: 0 trained, 28 masked\n [/INST] Let me double-check." in text
    assert text.endswith(
        "▸ assistant: 16 trained, 7 masked\n [/INST][[ The]]<<diverges here>>[[ output is 16.\n\nThe answer is $\\boxed{16}$.</s>]]\n"
    )


def test_unknown_template_family_falls_back_to_trained_and_masked_runs():
    template = (
        "{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant\n{% endif %}"
    )
    tok = with_template("gemma", template)
    record = cached_record(tok, math_agent_pairs()["diverge_at_first_assistant"])  # 3 assistant turns to train
    view = show.build_view(PairRecord.from_row(record), tok, 0, ["chosen"])
    assert view.family is None
    turns = view.sides[0].turns
    assert [turn.role for turn in turns] == ["masked", "trained", "masked", "trained", "masked", "trained", "masked"]
    assert [turn.trained for turn in turns if turn.role == "trained"] == [
        len(t.tokens) for t in turns if t.role == "trained"
    ]
    assert sum(turn.trained for turn in turns) == sum(label != IGNORE for label in record["chosen_labels"])
    text = show.plain_text(view)
    assert (
        text.splitlines()[1] == "turns: template family unknown, each run of trained or masked tokens is shown as one"
    )


def test_token_starts_split_characters_and_tokens_that_do_not_round_trip():
    tok = family_tokenizer("gemma")
    ids = tok("<bos>Zoë: 4€ 😀 ∑ done", add_special_tokens=False)["input_ids"]
    assert sum("\ufffd" in tok.decode([i]) for i in ids) == 5  # '€' and '😀' are split over byte-level tokens
    text, starts = token_starts(tok, ids)
    assert text == "<bos>Zoë: 4€ 😀 ∑ done"
    # Each split character is shown once, by the last of its tokens; the pieces join to the text.
    pieces = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    assert pieces == ["<bos>", "Zoë", ":", " 4", "", "€", " ", "", "😀", " ∑", " d", "on", "e"]
    # Single letters where BPE would merge "hello": re-tokenizing differs, so each token's own
    # decoding is laid end to end.
    letters = tok.convert_tokens_to_ids(list("hello"))
    assert token_starts(tok, letters) == ("hello", [0, 1, 2, 3, 4])


# ── --tokens, --search, --random ──────────────────────────────────────────────

SUBSCRIPT_DIGITS = "₀₁₂₃₄₅₆₇₈₉"


def test_tokens_option_shows_each_token_and_its_id(cli_cache):
    result = invoke("show-sample", cli_cache, "--index", INDEX, "--side", "chosen", "--tokens")
    assert result.exit_code == 0, result.output
    record = datasets.load_from_disk(str(cli_cache))[INDEX]
    ids = record["chosen_input_ids"]
    body = result.stdout.split("──\n", 1)[1]
    body = "".join(line for line in body.splitlines(keepends=True) if not line.startswith("▸ "))
    body = body.replace("[[", "").replace("]]", "").replace("<<diverges here>>", "")
    shown = re.findall(rf"(.*?)([{SUBSCRIPT_DIGITS}]+)\n?", body, flags=re.S)
    assert [int(number.translate(str.maketrans(SUBSCRIPT_DIGITS, "0123456789"))) for _, number in shown] == ids
    text, starts = token_starts(embedded_tokenizer(), ids)
    pieces = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    assert [piece.replace("↵", "\n") for piece, _ in shown] == pieces
    assert "<start_of_turn>₄user₁₃₇₃↵₂₀₄\n" in result.stdout  # a newline token: ↵, its id, then the line ends


def expected_matches(cache: Path, needle: str) -> list[int]:
    """Brute force: decode every pair (the code under test decodes in batches)."""
    tok, ds = embedded_tokenizer(), datasets.load_from_disk(str(cache))
    needle = needle.casefold()
    return [
        n
        for n, r in enumerate(ds)
        if needle in tok.decode(r["chosen_input_ids"]).casefold()
        or needle in tok.decode(r["rejected_input_ids"]).casefold()
    ]


def test_search_finds_the_first_pair_then_the_next(cli_cache):
    matches = expected_matches(cli_cache, "NameError")
    assert len(matches) >= 2 and INDEX in matches  # pair 3's tool output is a NameError traceback
    result = invoke("show-sample", cli_cache, "--search", "nameerror", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["index"] == matches[0]
    after = invoke("show-sample", cli_cache, "--search", "nameerror", "--index", matches[0] + 1, "--side", "chosen")
    assert after.stdout.startswith(
        f"pair {matches[1]} (source row {matches[1]}; first match for 'nameerror'), shared prompt "
    )
    assert_user_error(
        invoke("show-sample", cli_cache, "-s", "no such words anywhere"),
        f"no pair in {cli_cache} contains 'no such words anywhere'",
    )
    assert_user_error(
        invoke("show-sample", cli_cache, "-s", "nameerror", "-i", matches[-1] + 1),
        f"no pair in {cli_cache} contains 'nameerror' at or after --index {matches[-1] + 1}",
    )


def test_random_pick(cli_cache):
    import random

    cache = open_cache(cli_cache)
    tok = cache.load_tokenizer()
    assert show.pick_index(cache, tok, None, None, True, rng=random.Random(7)) == (
        random.Random(7).randrange(240),
        "random",
    )
    matches = expected_matches(cli_cache, "NameError")
    index, how = show.pick_index(cache, tok, None, "NameError", True, rng=random.Random(7))
    assert index == random.Random(7).choice(matches) and how == f"random match for 'NameError', 1 of {len(matches)}"
    shown = json.loads(invoke("show-sample", cli_cache, "--random", "--json").stdout)
    record = datasets.load_from_disk(str(cli_cache))[shown["index"]]
    assert shown["chosen"]["input_ids"] == record["chosen_input_ids"] and shown["row"] == record["row"]
    assert_user_error(
        invoke("show-sample", cli_cache, "--random", "--index", 3), "--random picks the pair itself; drop --index"
    )


def test_json_lists_the_turns(cli_cache):
    shown = json.loads(invoke("show-sample", cli_cache, "--index", INDEX, "--json").stdout)
    turns = shown["chosen"]["turns"]
    assert [t["role"] for t in turns] == ["user", "model", "user", "model", "user", "model", "user", "model"]
    assert [t["start"] for t in turns] == [0] + [sum(t["tokens"] for t in turns[:k]) for k in range(1, len(turns))]
    assert sum(t["tokens"] for t in turns) == len(shown["chosen"]["input_ids"])
    assert sum(t["trained"] for t in turns) == sum(label != IGNORE for label in shown["chosen"]["labels"])


# ── terminal layout and colours ───────────────────────────────────────────────


def terminal_output(cache: Path, width: int) -> tuple[str, str]:
    from rich.console import Console

    console = Console(width=width, force_terminal=True, color_system="truecolor", record=True)
    show.show_sample(cache, INDEX, "both", console)
    return console.export_text(styles=True, clear=False), console.export_text()


def test_terminal_side_by_side_when_wide_and_stacked_when_narrow(cli_cache):
    record = datasets.load_from_disk(str(cli_cache))[INDEX]
    chosen = f"chosen: {record['chosen_len']} tokens"
    rejected = f"rejected: {record['rejected_len']} tokens"
    _, wide = terminal_output(cli_cache, 160)
    assert any(chosen in line and rejected in line for line in wide.splitlines())
    assert (
        sum(" model " in line and line.count(" model ") == 2 for line in wide.splitlines()) >= 2
    )  # labels face each other
    _, narrow = terminal_output(cli_cache, 100)
    lines = narrow.splitlines()
    assert not any(chosen in line and rejected in line for line in lines)
    assert next(n for n, line in enumerate(lines) if chosen in line) < next(
        n for n, line in enumerate(lines) if rejected in line
    )
    assert sum(line.startswith(" user ") for line in lines) == 4 + 2  # user turns of chosen + rejected, each labelled


def test_terminal_and_html_use_the_same_colours(cli_cache, tmp_path):
    from rich.style import Style

    ansi, _ = terminal_output(cli_cache, 160)

    def rgb(hex_colour: str) -> str:
        return ";".join(str(int(hex_colour[i : i + 2], 16)) for i in (1, 3, 5))

    assert f"\x1b[1;38;2;{rgb(show.COLORS['trained'])}m" in ansi and f"\x1b[38;2;{rgb(show.COLORS['masked'])}m" in ansi
    assert Style.parse(show.TRAINED).color.triplet.hex == show.COLORS["trained"]
    assert Style.parse(show.MASKED).color.triplet.hex == show.COLORS["masked"]
    page = html_of(cli_cache, tmp_path)
    assert f".trained {{ color: {show.COLORS['trained']}; font-weight: bold; }}" in page
    assert f".masked {{ color: {show.COLORS['masked']}; }}" in page


# ── --html ────────────────────────────────────────────────────────────────────


class SpansByClass(HTMLParser):
    """Text under each class of span, per <section id=side>; role labels per side."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.side = None
        self.text: dict = {}
        self.roles: dict = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.side = attrs["id"]
        self.stack.append(attrs.get("class", tag))

    def handle_endtag(self, tag):
        self.stack.pop()

    def handle_data(self, data):
        if self.side is None:
            return
        if self.stack and self.stack[-1] == "role":
            self.roles.setdefault(self.side, []).append(data)
        if "pre" in self.stack:
            kind = next((c for c in reversed(self.stack) if c in ("trained", "masked", "diverge")), None)
            self.text.setdefault((self.side, kind), []).append(data)


def html_of(cache: Path, tmp_path: Path, *args: str) -> str:
    page = tmp_path / "pair.html"
    result = invoke("show-sample", cache, "--index", INDEX, "--html", page, *args)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {page} (pair {INDEX})\n"
    return page.read_text(encoding="utf-8")


def test_html_page_is_standalone_and_shows_the_mask(cli_cache, tmp_path):
    page = html_of(cli_cache, tmp_path)
    assert page.startswith("<!doctype html>")
    assert "default-src 'none'" in page  # the browser may fetch nothing
    for external in ("<script", "<link", "<img", "url(", "@import", "src=", "href=", "://"):
        assert external not in page, external
    parsed = SpansByClass()
    parsed.feed(page)
    record = datasets.load_from_disk(str(cli_cache))[INDEX]
    shown = json.loads(invoke("show-sample", cli_cache, "--index", INDEX, "--json").stdout)
    tok = embedded_tokenizer()
    for side in ("chosen", "rejected"):
        ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
        assert "".join(parsed.text[(side, "trained")]) == "".join(decoded_runs(tok, ids, labels))
        assert parsed.text[(side, "diverge")] == ["▶"]
        whole = "".join(
            piece for (s, kind), pieces in parsed.text.items() if s == side and kind != "diverge" for piece in pieces
        )
        assert sorted(whole) == sorted(tok.decode(ids))  # every character once (runs interleave)
        assert parsed.roles[side] == [t["role"] for t in shown[side]["turns"]]


def test_html_tokens_option_boxes_each_token(cli_cache, tmp_path):
    page = html_of(cli_cache, tmp_path, "--tokens")
    record = datasets.load_from_disk(str(cli_cache))[INDEX]
    n_tokens = record["chosen_len"] + record["rejected_len"]
    assert page.count('<span class="tok"') == n_tokens
    ids = [int(i) for i in re.findall(r"<sub>(\d+)</sub>", page)]
    assert ids == record["chosen_input_ids"] + record["rejected_input_ids"]


def test_html_needs_an_existing_folder(cli_cache, tmp_path):
    assert_user_error(
        invoke("show-sample", cli_cache, "--html", tmp_path / "nope" / "p.html"),
        f"--html: folder {tmp_path / 'nope'} does not exist",
    )
    assert_user_error(
        invoke("show-sample", cli_cache, "--html", tmp_path / "p.html", "--json"),
        "--json and --html are exclusive; pick one",
    )


SCREENSHOT = Path(__file__).parents[1] / "scripts" / "screenshot_html.sh"


def test_html_renders_in_headless_chromium_with_the_colours(cli_cache, tmp_path):
    """scripts/screenshot_html.sh: the page as a browser draws it has green trained text, grey
    masked text, blue role labels and the yellow divergence marker. Skipped without Chromium."""
    import shutil

    if not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    image = pytest.importorskip("PIL.Image")
    html_of(cli_cache, tmp_path)
    png = tmp_path / "pair.png"
    proc = subprocess.run(
        [str(SCREENSHOT), str(tmp_path / "pair.html"), str(png), "1400,900"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    import numpy as np

    picture = np.asarray(image.open(png).convert("RGB"), dtype=int)
    assert picture.shape == (900, 1400, 3)

    def near(colour: str, pixels) -> int:
        target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(pixels - target) <= 12).all(axis=-1).sum())

    for name in ("trained", "masked", "role", "diverge"):
        assert near(show.COLORS[name], picture) > 100, name
    for half in (picture[:, :700], picture[:, 700:]):  # side by side: trained text in both columns
        assert near(show.COLORS["trained"], half) > 100


# ── a KTO cache: one sequence per row, under its label ─────────────────────────


@pytest.fixture(scope="module")
def kto_cache(tmp_path_factory):
    from trainkit import make_kto_cache

    return make_kto_cache(tmp_path_factory.mktemp("kto-show"), n=3)  # rows 0, 2, 4 desirable; 1, 3, 5 not


def test_a_kto_row_is_shown_as_one_sequence_with_its_label(kto_cache):
    result = invoke("show-sample", kto_cache, "--index", 1)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    record = open_cache(kto_cache).record(1)
    assert (
        lines[0]
        == f"row 1 (source row 1), undesirable, prompt {record.prompt_len} tokens; trained text is [[bracketed]]"
    )
    assert lines[1].startswith("── undesirable: ") and "<<diverges here>>" not in result.stdout
    assert "chosen" not in result.stdout and "── " not in "".join(lines[2:])
    tok = embedded_tokenizer()
    shown = re.findall(r"\[\[(.*?)\]\]", "\n".join(lines[1:]), flags=re.S)  # the title names [[bracketed]]
    assert shown == decoded_runs(tok, record.sequence.input_ids, record.sequence.labels)
    as_json = json.loads(invoke("show-sample", kto_cache, "--index", 2, "--json").stdout)
    assert as_json["label"] is True and set(as_json) == {"index", "row", "prompt_len", "label", "sequence"}
    assert as_json["sequence"]["labels"] == open_cache(kto_cache).record(2).sequence.labels
    assert_user_error(
        invoke("show-sample", kto_cache, "--side", "chosen"),
        f"{kto_cache} is a KTO cache: a row is one sequence, with its label; drop --side chosen",
    )
    assert_user_error(
        invoke("show-sample", kto_cache, "--index", 9), f"--index 9 is out of range: {kto_cache} holds 6 rows"
    )


def test_a_kto_row_is_found_by_its_text_and_drawn_as_html(kto_cache, tmp_path):
    result = invoke("show-sample", kto_cache, "--search", "boxed", "--index", 3)
    assert result.exit_code == 0 and result.stdout.startswith("row 3 (source row 3; first match for 'boxed')")
    page = tmp_path / "row.html"
    assert invoke("show-sample", kto_cache, "--index", 0, "--html", page).stdout.startswith(f"wrote {page} (row 0)")
    text = page.read_text()
    assert "<title>mtdpo: row 0</title>" in text and "diverges" not in text and 'id="desirable"' in text


@pytest.mark.parametrize("family", list(FAMILY_TURNS))
def test_the_plain_tokenizer_shows_what_the_transformers_one_shows(family, tmp_path):
    """show-sample reads the cache's tokenizer copy with `tokenizers` alone (no transformers, no
    torch): the same view, token for token, as the transformers tokenizer gives."""
    from mtdpo.cache.reader import PlainTokenizer

    tok = family_tokenizer(family)
    tok.save_pretrained(str(tmp_path))
    plain = PlainTokenizer.read(tmp_path, tok.chat_template)
    assert plain is not None
    row = cached_record(tok, for_family(math_agent_pairs()["shared_code_and_tool_exchange"], family))
    record, sides = PairRecord.from_row(row), ["chosen", "rejected"]
    assert show.build_view(record, plain, 0, sides) == show.build_view(record, tok, 0, sides)
    ids = [row["chosen_input_ids"], row["rejected_input_ids"]]
    assert plain.batch_decode(ids) == tok.batch_decode(ids)


def test_show_sample_imports_neither_transformers_nor_torch(cli_cache):
    """Showing one pair of a Gemma 3 cache took 8 s and 0.9 GB, most of it importing torch through
    AutoTokenizer: the pair and the tokenizer copy are all it needs."""
    code = (
        "import sys; from rich.console import Console; from mtdpo import show; "
        f"show.show_sample({str(cli_cache)!r}, 3, 'both', Console(file=open('/dev/null', 'w'))); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"
