"""Helpers the tests share: tokenizers per template family, math-agent pairs, trained-run
decoding, preprocessing in-process, and running a command of the CLI.

Plain functions and constants, imported with `from helpers import ...`; the session fixtures
that build expensive objects once live in conftest.py. (Training helpers: trainkit.py.)
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

from typer.testing import CliRunner

from mtdpo.assets import EMBEDDED_TOKENIZER, SAMPLE_DATA
from mtdpo.cache import IGNORE_INDEX, open_cache
from mtdpo.cli import app
from mtdpo.preprocess.records import MaskOptions, RecordBuilder

TESTS = Path(__file__).parent
REPO = TESTS.parent
TEMPLATES = TESTS / "templates"
ALL_FAMILIES: dict[str, dict] = json.loads((TEMPLATES / "families.json").read_text())
# The per-family tests iterate FAMILIES; the real agent templates (suite "real-agent") are checked
# against the independent oracle instead (tests/oracle.py, scripts/template_table.py).
FAMILIES: dict[str, dict] = {name: spec for name, spec in ALL_FAMILIES.items() if spec.get("suite") != "real-agent"}
GEMMA_USER, GEMMA_END = "<start_of_turn>user\n", "<end_of_turn>\n"  # the original seed markers
IGNORE = -100  # docs/DESIGN.md: the label of every token that is not trained
assert IGNORE_INDEX == IGNORE


# ── tokenizers ────────────────────────────────────────────────────────────────


@functools.cache
def family_tokenizer(family: str):
    """The embedded byte-level BPE plus one family's special tokens and real chat template.

    Families with `token_flags` (the real agent templates) get each token as an AddedToken with the
    model's own flags: Phi-3.5's `<|end|>` has rstrip=True and swallows the newline after it, so a
    tokenizer with default flags would give different ids. Cached: treat the result as read-only
    (copy.deepcopy it before changing anything).
    """
    from transformers import AutoTokenizer

    spec = ALL_FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    if "token_flags" in spec:
        _add_flagged_tokens(tok, spec)
    else:
        specials = {"additional_special_tokens": spec["special_tokens"], "eos_token": spec["eos_token"]}
        if spec["bos_token"]:
            specials["bos_token"] = spec["bos_token"]
        tok.add_special_tokens(specials)
        tok.add_tokens(spec.get("added_tokens", []))  # e.g. Qwen's <tool_call>: added, not special
    tok.chat_template = (TEMPLATES / spec.get("template", f"{family}.jinja")).read_text()
    markers = [spec["end_of_turn"]] if spec["end_of_turn"] else spec["stop_tokens"]
    assert tok.eos_token == spec["eos_token"] and all(tok.convert_tokens_to_ids(m) != tok.unk_token_id for m in markers)
    return tok


def _add_flagged_tokens(tok, spec: dict) -> None:
    """Add every token the template emits with its real flags (special, lstrip, rstrip, normalized, single_word)."""
    from transformers import AddedToken

    flags = spec["token_flags"]
    tokens = [AddedToken(t, **flags[t]) for t in flags]
    special = [t for t in tokens if t.special]
    tok.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    tok.add_tokens([t for t in tokens if not t.special])
    by_name = {t.content: t for t in tokens}
    tok.eos_token = by_name.get(spec["eos_token"], spec["eos_token"])
    if spec["bos_token"]:
        tok.bos_token = by_name.get(spec["bos_token"], spec["bos_token"])


def with_template(family: str, template: str):
    """A private copy of a family's tokenizer with another chat template."""
    tok = copy.deepcopy(family_tokenizer(family))
    tok.chat_template = template
    return tok


@functools.cache
def embedded_tokenizer():
    """The embedded tiny Gemma-style tokenizer with its own template (the CLI default)."""
    from mtdpo.preprocess.tokenizer import load_tokenizer

    return load_tokenizer()


class RowEncoder:
    """RecordBuilder for tests: a row in, its record as the shards hold it (a dict of columns) and
    whether it was truncated out; `builder` is the RecordBuilder (its chat template, encoder …)."""

    def __init__(self, tokenizer, options: MaskOptions = MaskOptions(), one_render: bool = True):
        self.tokenizer, self.builder = tokenizer, RecordBuilder(tokenizer, options, one_render)

    def __call__(self, row, n: int = 0) -> tuple[dict, bool]:
        record, truncated = self.builder(n, row)
        return record.to_row(), truncated

    def sequences(self, row, side: str = "chosen") -> list[tuple[str, list[str]]]:
        """(decoded text, decoded trained runs) of each sequence of one side of a row."""
        record, _ = self.builder(0, row)
        decode = self.tokenizer.decode
        return [
            (decode(p.input_ids), [decode(run) for run in trained_runs(p.input_ids, p.labels)])
            for p in record.side(side).pieces()
        ]


def cache_dataset(path, **options):
    """A cache's memory-mapped pairs as a datasets.Dataset (open_cache(...).dataset)."""
    return open_cache(path, **options).dataset


# ── rows ──────────────────────────────────────────────────────────────────────


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def sample_rows(n: int | None = None) -> list[dict]:
    """Rows of the embedded sample (240 math-agent pairs, RLHFlow shape, `tool` turns)."""
    lines = SAMPLE_DATA.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON lines; a `bytes` or `str` item is written as that raw line."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row)
            elif isinstance(row, str):
                f.write(row.encode("utf-8"))
            else:
                f.write(json.dumps(row, ensure_ascii=False).encode("utf-8"))
            f.write(b"\n")
    return path


def for_family(row: dict, family: str) -> dict:
    """Adapt a canonical row (system/user/assistant/tool) to what a family's template accepts.

    Tool turns take the family's tool role, or become user turns where it has none (as the
    original Gemma math-agent data did). Gemma has no system role: the system text is put in
    front of the first user turn, as Gemma's own later templates do.
    """
    tool_role = ALL_FAMILIES[family]["tool_role"] or "user"
    out = dict(row)
    for side in ("prompt", "chosen", "rejected"):
        if isinstance(row.get(side), list):
            out[side] = [dict(m, role=tool_role) if m["role"] == "tool" else dict(m) for m in row[side]]
    if family == "gemma":
        out = _fold_system(out)
    return out


def _fold_system(row: dict) -> dict:
    first = "prompt" if "prompt" in row else "chosen"
    if row[first][0]["role"] != "system":
        return row
    out = dict(row)
    for side in ("chosen", "rejected") if first == "chosen" else ("prompt",):
        system, user, *rest = row[side]
        out[side] = [msg("user", system["content"] + "\n\n" + user["content"]), *rest]
    return out


def math_agent_pairs() -> dict[str, dict]:
    """Hand-written multi-turn math-agent pairs in canonical roles, keyed by what they exercise.

    question → assistant with python code → tool output → assistant follow-up → final answer;
    the sides diverge at an assistant turn (the first one, or after a shared exchange).
    """
    system = msg("system", "You are a math assistant with a Python interpreter.")
    question = msg("user", "Zoë buys 3 crêpes at €4 each and pays with €20. How much change does she get?")
    code = msg("assistant", "The cost is 3 × €4.\n```python\nprint(20 - 3 * 4)\n```")
    out = msg("tool", "```output\n8\n```")
    check = msg("assistant", "Let me double-check.\n```python\nprint(20 - 12 == 8)\n```")
    true = msg("tool", "```output\nTrue\n```")
    final = msg("assistant", "The check passes.\n\nThe answer is $\\boxed{8}$.")
    bad_code = msg("assistant", "Subtract the price once.\n```python\nprint(20 - 4)\n```")
    bad_out = msg("tool", "```output\n16\n```")
    bad_final = msg("assistant", "The output is 16.\n\nThe answer is $\\boxed{16}$.")
    # Both continuations start with the same words, so the token-level common prefix runs
    # past the shared messages into trained text.
    same_start = msg("assistant", "The output is 8.\n\nThe answer is $\\boxed{8}$.")
    return {
        "diverge_at_first_assistant": {
            "chosen": [system, question, code, out, check, true, final],
            "rejected": [system, question, bad_code, bad_out, bad_final],
        },
        "shared_code_and_tool_exchange": {
            "chosen": [question, code, out, check, true, final],
            "rejected": [question, code, out, bad_code, bad_out, bad_final],
        },
        "diverge_at_last_assistant": {
            "chosen": [system, question, code, out, check, true, final],
            "rejected": [system, question, code, out, check, true, bad_final],
        },
        "same_words_after_divergence": {
            "chosen": [system, question, code, out, same_start],
            "rejected": [system, question, code, out, bad_final],
        },
    }


# ── masks ─────────────────────────────────────────────────────────────────────


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of trained tokens (label != -100), each checked to carry its own id."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, f"a trained label {label} differs from its token id {token}"
            current.append(token)
    if current:
        runs.append(current)
    return runs


def decoded_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    return [tok.decode(run) for run in trained_runs(ids, labels)]


def n_prompt_messages(row: dict) -> int:
    """Messages shared by both sides (computed here, not by the code under test)."""
    if "prompt" in row:
        return len(row["prompt"]) if isinstance(row["prompt"], list) else 1
    n = 0
    while row["chosen"][n] == row["rejected"][n]:
        n += 1
    return n


# ── the original research rule ────────────────────────────────────────────────


def seed_reference(tok, messages: list[dict], n_prompt: int, user: str = GEMMA_USER, end: str = GEMMA_END) -> list[int]:
    """Labels of the original research rule, computed from its statement over token ids only:
    mask the shared prompt including the first `<start_of_turn>model\\n`; mask from each
    user-marker token sequence through the next end-marker sequence inclusive; train the
    rest (so later `<start_of_turn>model\\n` headers are trained)."""
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = tok.apply_chat_template(messages[:n_prompt], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # Gemma headers end in "\n" + content: token-stable
    user_ids = tok(user, add_special_tokens=False)["input_ids"]
    end_ids = tok(end, add_special_tokens=False)["input_ids"]

    labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) :]
    i = 0
    while i < len(ids):
        if ids[i : i + len(user_ids)] != user_ids:
            i += 1
            continue
        j = i + len(user_ids)
        while j < len(ids) and ids[j : j + len(end_ids)] != end_ids:
            j += 1
        j = min(j + len(end_ids), len(ids))  # through the end marker, inclusive
        labels[i:j] = [IGNORE] * (j - i)
        i = j
    return labels


# ── caches ────────────────────────────────────────────────────────────────────


def run_preprocess(input_path: Path, out: Path, **kwargs) -> dict:
    from mtdpo.preprocess.pipeline import preprocess

    return preprocess(input_path, out, progress=False, **kwargs)


def edit_manifest(cache: Path, change) -> Path:
    """Apply `change` to a cache's manifest (a dict, changed in place) and record the new bytes in
    checksums.json, as a deliberate edit: what a test of a later check needs."""
    from mtdpo.cache.files import record_checksums

    manifest = json.loads((Path(cache) / "manifest.json").read_text())
    change(manifest)
    (Path(cache) / "manifest.json").write_text(json.dumps(manifest))
    record_checksums(cache, ["manifest.json"])
    return Path(cache)


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporary siblings preprocess may create (.NAME.incomplete-PID, .parts-, .old-)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# ── the command line ──────────────────────────────────────────────────────────

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def assert_user_error(result, message: str) -> None:
    """Exit code 2, one line on stderr naming the problem, nothing on stdout, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {message}"
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
