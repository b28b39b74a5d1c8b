"""Write the malformed-input corpus that tests/preprocess/test_faults.py runs through `mtdpo preprocess`.

    python tests/data/make_faults.py          # rewrites the files below; the output is deterministic
    python tests/data/make_faults.py --doc    # then the fault tables of docs/RELIABILITY.md

faults.jsonl               good rows (mtdpo.synthetic.make_pairs) with one fault between each two
faults.expected.json       per line of faults.jsonl: the fault's name and what mtdpo must do with it
gemma2_faults.jsonl        rows that only the real Gemma-2 template refuses (its own raise_exception)
gemma2_faults.expected.json
templates/raises.jinja     a template that raises on one row (raise_exception, as real templates do)
templates/escape.jinja     a template that tries to leave Jinja's sandbox to run a shell command

An outcome is "kept", "truncated" (kept, cut to --max-length), "dropped" (valid, but truncation
left no trained token), "rejected" (unusable; the reason goes to rejects.jsonl) or "skipped"
(a blank line: not a row, though it has a row number). Reasons are written here by hand: they
are the specification of what a person reads in rejects.jsonl.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from mtdpo.preprocess.records import NO_TOOL_SUPPORT  # noqa: E402
from mtdpo.synthetic import make_pairs  # noqa: E402

ROLES = "system, user, assistant, tool, observation, ipython, function"
MAX_LENGTH = 2048  # preprocess's default, which the corpus is run with
Q = {"role": "user", "content": "What is 17 * 23 + 5?"}
A = {"role": "assistant", "content": "17 * 23 = 391, plus 5 is \\boxed{396}."}
B = {"role": "assistant", "content": "By hand: 17 * 23 = 381, so \\boxed{386}."}
SYSTEM = {"role": "system", "content": "You are a careful math assistant."}


def msg(role, content):
    return {"role": role, "content": content}


def pair(chosen, rejected, **extra) -> dict:
    return {"chosen": chosen, "rejected": rejected, **extra}


def line(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def rejected(reason: str) -> dict:
    return {"outcome": "rejected", "reason": reason}


def dropped(reason: str) -> dict:
    return {"outcome": "dropped", "reason": reason}


KEPT, TRUNCATED, SKIPPED = {"outcome": "kept"}, {"outcome": "truncated"}, {"outcome": "skipped"}
GOOD_LINE = line(pair([Q, A], [Q, B]))
LONG = "Let me reason about each digit carefully. " * 2500  # 105,000 characters, ~25,000 tokens
MANY_TURNS = [Q] + [m for i in range(60) for m in (msg("assistant", f"Step {i}: run it."), msg("tool", f"out {i}"))]
TOO_MANY = [Q] + [m for i in range(300) for m in (msg("assistant", f"Step {i}."), msg("tool", f"out {i}"))]
PICKLE = "cos\nsystem\n(S'touch /tmp/mtdpo-pwned'\ntR."  # protocol-0 pickle of os.system(...)
JINJA = "{{ raise_exception('pwned') }}{% for x in range(10**9) %}x{% endfor %}{{ ''.__class__.__mro__ }}"

# (name, raw line, expected). Each line is written between two good rows.
FAULTS: list[tuple[str, bytes, dict]] = [
    # ── not a JSON object ──
    ("invalid JSON", b'{"chosen": [', rejected("invalid JSON: Expecting value at column 13")),
    (
        "JSON with single quotes (a Python dict)",
        str(pair([Q, A], [Q, B])).encode(),
        rejected("invalid JSON: Expecting property name enclosed in double quotes at column 2"),
    ),
    (
        "trailing garbage after the row",
        GOOD_LINE + b" x",
        rejected(f"invalid JSON: Extra data at column {len(GOOD_LINE) + 2}"),
    ),
    (
        "two rows on one line",
        GOOD_LINE + GOOD_LINE,
        rejected(f"invalid JSON: Extra data at column {len(GOOD_LINE) + 1}"),
    ),
    ("row is a list", b"[1, 2]", rejected("row is a list, expected a JSON object")),
    ("row is a string", b'"chosen"', rejected("row is a string, expected a JSON object")),
    ("row is null", b"null", rejected("row is null, expected a JSON object")),
    ("row is a number", b"42", rejected("row is a number, expected a JSON object")),
    ("invalid UTF-8", b'{"chosen": "\xff\xfe"}', rejected("line is not valid UTF-8 (byte 12)")),
    (
        "duplicated keys",
        b'{"chosen": [], "rejected": [], "chosen": []}',
        rejected("duplicated key(s) in one object: chosen"),
    ),
    (
        "JSON nested 100,000 levels deep",
        b'{"chosen": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        rejected("invalid JSON: nested too deeply (more levels of lists or objects than Python's recursion limit)"),
    ),
    (
        "a 5,000-digit number",
        b'{"chosen": [], "rejected": [], "id": ' + b"7" * 5000 + b"}",
        rejected("invalid JSON: a number has 5,000 digits, more than 4,300"),
    ),
    # ── missing or empty parts ──
    ("empty object", b"{}", rejected("missing key 'chosen' (row keys: [])")),
    ("missing chosen", line({"rejected": [Q, B]}), rejected("missing key 'chosen' (row keys: ['rejected'])")),
    ("missing rejected", line({"chosen": [Q, A]}), rejected("missing key 'rejected' (row keys: ['chosen'])")),
    ("prompt only", line({"prompt": [Q]}), rejected("missing key 'chosen' (row keys: ['prompt'])")),
    (
        "prompt with empty sides",
        line({"prompt": [Q], "chosen": [], "rejected": []}),
        rejected("empty conversation: chosen has no messages after the prompt"),
    ),
    ("empty conversation", line(pair([], [])), rejected("empty conversation: chosen has no messages")),
    ("empty rejected conversation", line(pair([Q, A], [])), rejected("empty conversation: rejected has no messages")),
    # ── bad messages ──
    ("message without role", line(pair([{"content": "Hi"}, A], [Q, B])), rejected("chosen[0] has no 'role'")),
    (
        "ShareGPT-style message",
        line(pair([{"from": "human", "value": "Hi"}, A], [Q, B])),
        rejected(
            "chosen[0] has no 'role' (ShareGPT-style 'from'/'value' messages must be converted to 'role'/'content')"
        ),
    ),
    (
        "message without content",
        line(pair([Q, {"role": "assistant"}], [Q, B])),
        rejected("chosen[1] (assistant) has no 'content'"),
    ),
    (
        "unknown role",
        line(pair([Q, msg("model", "396")], [Q, B])),
        rejected(f"chosen[1] has unknown role 'model' (known: {ROLES})"),
    ),
    (
        "capitalised role",
        line(pair([msg("User", "Hi"), A], [Q, B])),
        rejected(f"chosen[0] has unknown role 'User' (known: {ROLES}; roles are lower-case)"),
    ),
    (
        "role is a number",
        line(pair([Q, {"role": 1, "content": "x"}], [Q, B])),
        rejected(f"chosen[1] role is a number, expected a string (one of: {ROLES})"),
    ),
    (
        "rich markup in a role",
        line(pair([Q, msg("[/bold]", "x")], [Q, B])),
        rejected(f"chosen[1] has unknown role '[/bold]' (known: {ROLES})"),
    ),
    (
        "None content",
        line(pair([Q, {"role": "assistant", "content": None}], [Q, B])),
        rejected(
            "chosen[1] (assistant) content is null, expected a string or a list of text parts (null only with tool_calls)"
        ),
    ),
    (
        "number content",
        line(pair([Q, A], [Q, {"role": "assistant", "content": 386}])),
        rejected("rejected[1] (assistant) content is a number, expected a string or a list of text parts"),
    ),
    (
        "NaN content",
        b'{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": NaN}], "rejected": []}',
        rejected("chosen[1] (assistant) content is NaN, expected a string or a list of text parts"),
    ),
    (
        "Infinity content",
        b'{"chosen": [{"role": "user", "content": Infinity}], "rejected": []}',
        rejected("chosen[0] (user) content is Infinity, expected a string or a list of text parts"),
    ),
    (
        "boolean content",
        line(pair([Q, {"role": "assistant", "content": True}], [Q, B])),
        rejected("chosen[1] (assistant) content is a boolean, expected a string or a list of text parts"),
    ),
    (
        "content part that is not text",
        line(
            pair([Q, {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}], [Q, B])
        ),
        rejected(
            "chosen[1] (assistant) content part 0 has type 'image_url': only text parts can be trained (mtdpo is text-only)"
        ),
    ),
    (
        "content as an object",
        line(pair([{"role": "user", "content": {"text": "Hi"}}, A], [Q, B])),
        rejected("chosen[0] (user) content is an object, expected a string or a list of text parts"),
    ),
    (
        "lone UTF-16 surrogate in content",
        b'{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x\\ud800y"}], "rejected": []}',
        rejected("chosen[1] (assistant) content is not valid Unicode (a lone surrogate at character 1)"),
    ),
    (
        "nested lists of messages",
        line(pair([[Q, A]], [[Q, B]])),
        rejected("chosen[0] is a list, expected an object with 'role' and 'content'"),
    ),
    (
        "message is a string",
        line(pair(["What is 17 * 23 + 5?", A], [Q, B])),
        rejected("chosen[0] is a string, expected an object with 'role' and 'content'"),
    ),
    (
        "side is a number",
        line(pair(396, [Q, B])),
        rejected("chosen is a number, expected a list of messages or a string"),
    ),
    # ── conversations that are not a preference pair ──
    ("chosen identical to rejected", line(pair([Q, A], [Q, A])), rejected("chosen and rejected are identical")),
    (
        "identical once the template trims spaces",
        line(pair([Q, A], [Q, dict(A, content=A["content"] + "  ")])),
        rejected("chosen and rejected render to the same tokens"),
    ),
    (
        "no assistant turn after the prompt",
        line(pair([Q, A, msg("user", "Sure?")], [Q, A, msg("user", "Why?")])),
        rejected("chosen has no assistant message after the shared prompt (2 messages)"),
    ),
    (
        "sides disagree on a tool output",
        line(pair([Q, A, msg("tool", "396"), A], [Q, A, msg("tool", "386"), B])),
        rejected(
            "the sides disagree on the prompt: they first differ at message 2 (tool in chosen, tool in rejected), not at an assistant message"
        ),
    ),
    (
        "one side ends at the prompt",
        line(pair([Q, A], [Q, A, msg("user", "Sure?"), B])),
        rejected("chosen has no assistant message after the shared prompt (2 messages)"),
    ),
    (
        "only user messages",
        line(pair([msg("user", "a")], [msg("user", "b")])),
        rejected("chosen has no assistant message after the shared prompt (0 messages)"),
    ),
    (
        "sides disagree on the question",
        line(pair([Q, A], [msg("user", "What is 17 * 23?"), B])),
        rejected(
            "the sides disagree on the prompt: they first differ at message 0 (user in chosen, user in rejected), not at an assistant message"
        ),
    ),
    (
        "sides disagree on the system prompt",
        line(pair([SYSTEM, Q, A], [msg("system", "Be brief."), Q, B])),
        rejected(
            "the sides disagree on the prompt: they first differ at message 0 (system in chosen, system in rejected), not at an assistant message"
        ),
    ),
    (
        "empty assistant message",
        line(pair([Q, msg("assistant", "  ")], [Q, B])),
        rejected("message 1 (assistant) is empty: no content, reasoning or tool calls"),
    ),
    (
        "tool call in a template that cannot render one",
        line(
            pair(
                [
                    Q,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "type": "function",
                                "function": {"name": "python", "arguments": {"code": "print(17 * 23 + 5)"}},
                            }
                        ],
                    },
                    msg("tool", "396"),
                    A,
                ],
                [Q, B],
            )
        ),
        rejected(
            f"{NO_TOOL_SUPPORT}: message 1 (assistant): its tool call 0 name is not in the rendered turn "
            "(the template drops or alters it)"
        ),
    ),
    (
        "more than 512 messages",
        line(pair(TOO_MANY + [A], TOO_MANY + [B])),
        rejected("chosen has 602 messages, more than the 512 mtdpo renders per row"),
    ),
    # ── accepted: valid data that looks odd ──
    (
        "shared prefix ends inside an assistant message",
        line(
            pair(
                [Q, msg("assistant", "17 * 23 = 391, plus 5 is 396.")],
                [Q, msg("assistant", "17 * 23 = 391, plus 5 is 397.")],
            )
        ),
        KEPT,
    ),
    (
        "sides diverge after a shared assistant/tool exchange",
        line(
            pair(
                [Q, msg("assistant", "```python\nprint(17 * 23 + 5)\n```"), msg("tool", "396"), A],
                [Q, msg("assistant", "```python\nprint(17 * 23 + 5)\n```"), msg("tool", "396"), B],
            )
        ),
        KEPT,
    ),
    ("one side has an extra tool turn before its answer", line(pair([Q, msg("tool", "396"), A], [Q, B])), KEPT),
    (
        "system message in the middle",
        line(
            pair(
                [Q, A, msg("system", "Now be brief."), msg("user", "And 2 + 2?"), msg("assistant", "4")],
                [Q, A, msg("system", "Now be brief."), msg("user", "And 2 + 2?"), msg("assistant", "5")],
            )
        ),
        KEPT,
    ),
    (
        "consecutive user turns",
        line(pair([Q, msg("user", "Please hurry."), A], [Q, msg("user", "Please hurry."), B])),
        KEPT,
    ),
    (
        "consecutive assistant turns",
        line(pair([Q, A, msg("assistant", "Done.")], [Q, B, msg("assistant", "Done.")])),
        KEPT,
    ),
    (
        "extra keys in the row and in messages",
        line(pair([Q, dict(A, name="solver", tool_calls=None)], [Q, B], id="r1", score=0.9)),
        KEPT,
    ),
    (
        "content as a list of text parts",
        line(pair([Q, {"role": "assistant", "content": [{"type": "text", "text": "396"}]}], [Q, B])),
        KEPT,
    ),
    (
        "TRL shape with string shorthands",
        line({"prompt": "What is 17 * 23 + 5?", "chosen": "396", "rejected": "386"}),
        KEPT,
    ),
    ("CRLF line end", GOOD_LINE + b"\r", KEPT),  # written with "\n" after it: the line ends in \r\n
    ("byte-order mark at the start of a later line", b"\xef\xbb\xbf" + GOOD_LINE, KEPT),
    ("NUL and control characters in content", line(pair([Q, msg("assistant", "a\u0000b\u001b[31mc")], [Q, B])), KEPT),
    ("Jinja code in content is text", line(pair([msg("user", JINJA), A], [msg("user", JINJA), B])), KEPT),
    ("a pickle payload in content is text", line(pair([Q, msg("assistant", PICKLE)], [Q, B])), KEPT),
    ("121 messages (60 tool-use turns)", line(pair(MANY_TURNS + [A], MANY_TURNS + [B])), KEPT),
    ("extremely long answer (105,000 characters)", line(pair([Q, msg("assistant", LONG)], [Q, B])), TRUNCATED),
    (
        "prompt longer than --max-length",
        line(pair([msg("user", LONG), A], [msg("user", LONG), B])),
        dropped(f"chosen has no trained token left after truncation to --max-length {MAX_LENGTH}"),
    ),
    ("blank line", b"", SKIPPED),
    ("whitespace-only line", b" \t ", SKIPPED),
]


def write_corpus(path: Path, faults, good_rows: list[dict], first: bytes = b"", last: bytes = b"") -> list[dict]:
    """good, fault, good, fault, …, good; returns the expectation for every line."""
    lines, expected = [], []

    def add(raw: bytes, name: str, outcome: dict):
        expected.append({"row": len(lines), "fault": name, **outcome})
        lines.append(raw)

    for i, (name, raw, outcome) in enumerate(faults):
        add(
            (first if i == 0 else b"") + line(good_rows[i]),
            "good row" + (" after a byte-order mark" if i == 0 and first else ""),
            KEPT,
        )
        add(raw, name, outcome)
    add(line(good_rows[len(faults)]), "good row", KEPT)
    if last:
        add(
            last,
            "last line cut off without a newline",
            rejected("invalid JSON: Unterminated string starting at column 41"),
        )
    path.write_bytes(b"\n".join(lines) + (b"" if last else b"\n"))
    return expected


def gemma2_rows(n: int) -> list[dict]:
    """Synthetic pairs the real Gemma-2 template accepts: no system role, tool output as user turns."""
    rows = []
    for row in make_pairs(n, seed=7):
        sides = {}
        for side in ("chosen", "rejected"):
            msgs = [dict(m, role="user") if m["role"] == "tool" else dict(m) for m in row[side]]
            if msgs[0]["role"] == "system":
                system, user, *rest = msgs
                msgs = [msg("user", system["content"] + "\n\n" + user["content"]), *rest]
            sides[side] = msgs
        rows.append(sides)
    return rows


GEMMA2_FAULTS = [
    (
        "system message (Gemma-2 has no system role)",
        line(pair([SYSTEM, Q, A], [SYSTEM, Q, B])),
        rejected("chat template error: System role not supported"),
    ),
    (
        "system message in the middle",
        line(pair([Q, A, msg("system", "Be brief."), Q, A], [Q, A, msg("system", "Be brief."), Q, B])),
        rejected("chat template error: Conversation roles must alternate user/assistant/user/assistant/..."),
    ),
    (
        "consecutive user turns",
        line(pair([Q, msg("user", "Please hurry."), A], [Q, msg("user", "Please hurry."), B])),
        rejected("chat template error: Conversation roles must alternate user/assistant/user/assistant/..."),
    ),
    (
        "conversation starting with the assistant",
        line(pair([A, Q, A], [A, Q, B])),
        rejected("chat template error: Conversation roles must alternate user/assistant/user/assistant/..."),
    ),
    (
        "tool role after an assistant turn",
        line(pair([Q, A, msg("tool", "396"), A], [Q, A, msg("tool", "396"), B])),
        rejected(
            f"{NO_TOOL_SUPPORT}: chat template error: Conversation roles must alternate user/assistant/user/assistant/..."
        ),
    ),
]

RAISES = """{{ bos_token }}{% for message in messages %}\
{% if 'FORBIDDEN' in message['content'] %}{{ raise_exception('this template refuses the word FORBIDDEN') }}{% endif %}\
{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}
"""
# The classic server-side template injection: reach os through a function's globals.
ESCAPE = """{{ bos_token }}{{ cycler.__init__.__globals__.os.popen('touch /tmp/mtdpo-sandbox-escaped').read() }}\
{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}
"""


DOC = HERE.parents[1] / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- BEGIN generated by tests/data/make_faults.py --doc -->", "<!-- END generated -->"


def markdown() -> str:
    """The fault tables of docs/RELIABILITY.md, from the expectations written by main()."""
    out = [BEGIN, ""]
    for corpus, title in (
        ("faults", "`tests/data/faults.jsonl`, embedded Gemma-style template"),
        ("gemma2_faults", "`tests/data/gemma2_faults.jsonl`, `--chat-template tests/templates/gemma.jinja`"),
    ):
        out += [f"#### {title}", "", "| line | fault | outcome | what rejects.jsonl says |", "|---:|---|---|---|"]
        for e in json.loads((HERE / f"{corpus}.expected.json").read_text()):
            if not e["fault"].startswith("good row"):
                reason = f"`{e['reason']}`" if e.get("reason") else ""
                out.append(f"| {e['row']} | {e['fault']} | {e['outcome']} | {reason.replace('|', '&#124;')} |")
        out.append("")
    return "\n".join([*out, END])


def write_doc() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(head + markdown() + rest.split(END, 1)[1])


def main() -> None:
    if "--doc" in sys.argv:
        write_doc()
        print(f"wrote the fault tables of {DOC}")
        return
    good = list(make_pairs(len(FAULTS) + 1, seed=11))
    expected = write_corpus(
        HERE / "faults.jsonl",
        FAULTS,
        good,
        first=b"\xef\xbb\xbf",
        last=b'{"chosen": [{"role": "user", "content": "What is 1',
    )
    (HERE / "faults.expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    expected = write_corpus(HERE / "gemma2_faults.jsonl", GEMMA2_FAULTS, gemma2_rows(len(GEMMA2_FAULTS) + 1))
    (HERE / "gemma2_faults.expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    (HERE / "templates").mkdir(exist_ok=True)
    (HERE / "templates" / "raises.jinja").write_text(RAISES)
    (HERE / "templates" / "escape.jinja").write_text(ESCAPE)
    print(
        f"faults.jsonl: {len(FAULTS)} faults between {len(FAULTS) + 1} good rows; gemma2_faults.jsonl: {len(GEMMA2_FAULTS)}"
    )


if __name__ == "__main__":
    main()
