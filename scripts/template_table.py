"""Check `mtdpo preprocess` against the independent oracle on real chat templates, family by family.

    PYTHONPATH=. .venv/bin/python scripts/template_table.py --json out.json
    PYTHONPATH=. .venv/bin/python scripts/template_table.py --families glm4.6 gpt-oss --rows 60 --qa 10

For each family of tests/templates/families.json: its tokenizer (tests/helpers.family_tokenizer:
the embedded tiny BPE plus the family's tokens with their real flags and its real template) is
saved with save_pretrained; the agent rows (tests/agent_rows.py) are preprocessed by the CLI
(`python -m mtdpo preprocess ROWS --tokenizer DIR --out OUT -q`); the cache is read back (with
`mtdpo show-sample CACHE --json --all` where that option exists, else the Arrow shards, one
sequence per side) and compared with tests/oracle.py.

The checking rule: in every sequence, every maximal run of trained tokens [a, b) must match one
oracle turn of its side, `input_ids[:a] == context_ids` and `input_ids[a:b] == completion_ids`,
and every oracle turn is matched exactly once (none trained twice, none dropped). Columns:

- right: sequences whose runs all match distinct turns of a side whose turns are all matched;
- rejected: rows mtdpo rejected (reasons from rejects.jsonl, grouped);
- silently wrong: sequences kept whose side the oracle can express but which do not match it
  (the number that matters: a wrong mask nobody is told about);
- kept, inexpressible: sequences kept whose side has a turn the oracle cannot express (a
  template error once arguments are parsed, a generation opener the message lacks, ...);
- good rejected: rows rejected although the oracle expresses every turn of both sides;
  "lossless" counts only those whose template also renders every part of every trained message
  (its answer, its reasoning, each tool call's name): a template that drops a call turns a call
  into an empty answer, and a preprocessor may rightly refuse to train that.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from agent_rows import agent_rows, qa_rows  # noqa: E402
from helpers import ALL_FAMILIES, family_tokenizer  # noqa: E402
from oracle import Turn, row_turns  # noqa: E402

IGNORE = -100
COLUMNS = [
    "rows",
    "right",
    "sequences",
    "rejected",
    "silently_wrong",
    "kept_inexpressible",
    "good_rejected",
    "good_rejected_lossless",
    "oracle_good_rows",
]


# ── running mtdpo ────────────────────────────────────────────────────────────


def run_mtdpo(*args: str) -> subprocess.CompletedProcess:
    """The installed CLI of this checkout (PYTHONPATH = the repository root)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mtdpo", *args], capture_output=True, text=True, env=env, check=False)


def preprocess(rows: list[dict], tok_dir: Path, work: Path) -> tuple[Path, str]:
    """Write the rows as JSON lines and preprocess them; returns the cache and the CLI's output."""
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = work / "cache"
    done = run_mtdpo(
        "preprocess", str(data), "--tokenizer", str(tok_dir), "--out", str(out), "-q", "--max-length", "1000000"
    )
    return out, done.stdout + done.stderr


def read_cache(cache: Path) -> dict[int, dict[str, list[dict]]]:
    """{row: {side: [{"input_ids", "labels"}, ...]}} from `show-sample --json --all` when the CLI
    has it (a side may hold several sequences), else from the shards (schema 1: one per side)."""
    if not cache.exists():
        return {}
    if "--all" in run_mtdpo("show-sample", "--help").stdout:
        listing = run_mtdpo("show-sample", str(cache), "--json", "--all")
        pairs = [json.loads(line) for line in listing.stdout.splitlines() if line.strip()]
        return {p["row"]: {s: p[s]["sequences"] for s in ("chosen", "rejected")} for p in pairs}
    from datasets import load_from_disk

    table = load_from_disk(str(cache))
    return {
        r["row"]: {s: [{"input_ids": r[f"{s}_input_ids"], "labels": r[f"{s}_labels"]}] for s in ("chosen", "rejected")}
        for r in table
    }


def read_rejects(cache: Path) -> dict[int, str]:
    path = cache / "rejects.jsonl"
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["row"]: r["reason"] for r in lines}


# ── comparing ────────────────────────────────────────────────────────────────


def trained_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of trained tokens."""
    runs, start = [], None
    for n, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = n
        elif label == IGNORE and start is not None:
            runs.append((start, n))
            start = None
    return runs


def match_side(sequences: list[dict], turns: list[Turn], decode=None) -> tuple[list[bool], list[str]]:
    """Whether each sequence matches the oracle, and what is wrong (runs that match no turn,
    turns trained twice, turns dropped)."""
    used: Counter = Counter()
    seq_ok, problems = [], []
    for k, seq in enumerate(sequences):
        ids, labels = seq["input_ids"], seq["labels"]
        ok = all(label == IGNORE or label == tid for tid, label in zip(ids, labels, strict=True))
        if not ok:
            problems.append(f"sequence {k}: a label differs from its token id")
        for a, b in trained_runs(ids, labels):
            hit = [t for t in turns if t.ok and ids[:a] == t.context_ids and ids[a:b] == t.completion_ids]
            if hit:
                used[hit[0].message] += 1
                continue
            ok = False
            problems.append(
                f"sequence {k}: trained run [{a}, {b}) matches no oracle turn; {_closest(ids, a, b, turns, decode)}"
            )
        seq_ok.append(ok)
    wrong_count = [t.message for t in turns if t.ok and used[t.message] != 1]
    problems += [f"message {m}: trained {used[m]} times" for m in wrong_count]
    if wrong_count:  # a turn dropped or trained twice: the side's log-prob is wrong, whichever sequence is at fault
        seq_ok = [False] * len(sequences)
    return seq_ok, problems


def _closest(ids: list[int], a: int, b: int, turns: list[Turn], decode=None) -> str:
    """A hint for the report: the oracle turn whose context ends nearest the run's start."""
    candidates = [t for t in turns if t.ok]
    if not candidates:
        return "the oracle has no turn"
    t = min(candidates, key=lambda t: abs(len(t.context_ids) - a))
    n = len(t.context_ids)
    same_context = ids[:a] == t.context_ids
    hint = f"nearest: message {t.message}, context {'equal' if same_context else f'differs (oracle {n} tokens, run at {a})'}"
    if decode:
        hint += f"; mtdpo trains {decode(ids[a:b])[:200]!r}; the oracle expects {t.completion[:200]!r}"
        if not same_context:
            at = next((j for j, (x, y) in enumerate(zip(ids, t.context_ids)) if x != y), min(len(ids), n))
            hint += f"; contexts part at token {at}: mtdpo {decode(ids[at : at + 8])!r}, oracle {decode(t.context_ids[at : at + 8])!r}"
    return hint


# ── one family ───────────────────────────────────────────────────────────────


def check_family(family: str, rows: list[dict], work: Path) -> dict:
    """Run mtdpo on the rows with the family's tokenizer and compare with the oracle."""
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    family_tokenizer(family).save_pretrained(str(tok_dir))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))  # the tokenizer exactly as mtdpo loads it
    spec = ALL_FAMILIES[family]
    cache, log = preprocess(rows, tok_dir, work)
    kept, rejects = read_cache(cache), read_rejects(cache)
    result = dict.fromkeys(COLUMNS, 0) | {
        "family": family,
        "rows": len(rows),
        "reject_reasons": Counter(),
        "wrong_examples": [],
        "inexpressible_reasons": Counter(),
    }
    if not kept and not rejects:  # nothing kept: no cache, the CLI's summary says why
        result["error"] = log.strip().splitlines()[-1] if log.strip() else "no cache written"
        rejects = dict.fromkeys(range(len(rows)), "(no cache written; see the summary)")
        result["reject_reasons"] = _summary_reasons(result["error"])
    for n, row in enumerate(rows):
        turns = row_turns(tok, spec, row)
        expressible = all(t.ok for side in turns.values() for t in side) and any(turns.values())
        result["oracle_good_rows"] += expressible
        lossless = expressible and not any(t.dropped for side in turns.values() for t in side)
        for side in turns.values():
            for t in side:
                if not t.ok:
                    result["inexpressible_reasons"][_short(t.problem)] += 1
        if n in rejects:
            result["rejected"] += 1
            if "error" not in result:
                result["reject_reasons"][_short(rejects[n])] += 1
            result["good_rejected"] += expressible
            result["good_rejected_lossless"] += lossless
            continue
        if n not in kept:
            continue
        for side, sequences in kept[n].items():
            result["sequences"] += len(sequences)
            if not all(t.ok for t in turns[side]):
                result["kept_inexpressible"] += len(sequences)
                continue
            seq_ok, problems = match_side(sequences, turns[side], tok.decode)
            result["right"] += sum(seq_ok)
            result["silently_wrong"] += len(seq_ok) - sum(seq_ok)
            if problems and len(result["wrong_examples"]) < 6:
                result["wrong_examples"].append({"row": n, "side": side, "problems": problems[:3]})
    return result


def _summary_reasons(line: str) -> Counter:
    """Reasons and counts from the CLI's one-line summary ("kept 0 of 60 rows (24 chat template error, 6 ...)")."""
    inside = line[line.find("(") + 1 : line.rfind(")")] if "(" in line else line
    out = Counter()
    for part in re.split(r", (?=\d+ )", inside):
        count, _, reason = part.partition(" ")
        if count.isdigit():
            out[_short(reason)] += int(count)
    return out


def _short(reason: str) -> str:
    """Group reasons: numbers and quoted snippets replaced."""
    reason = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    return re.sub(r"\d+", "N", reason)[:160]


# ── the table ────────────────────────────────────────────────────────────────


def markdown(results: list[dict]) -> str:
    lines = ["| family | rows | oracle: good rows | sequences | right | rejected | **silently wrong** | kept, inexpressible | good rows rejected (lossless) | mtdpo's reject reasons (rows) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        why = (
            "<br>".join(f"{n} × `{reason}`" for reason, n in r["reject_reasons"].most_common()).replace("|", "\\|")
            or "-"
        )
        if r.get("error"):
            why = "(no cache: every row rejected) " + why
        lines.append(f"| {r['family']} | {r['rows']} | {r['oracle_good_rows']} | {r['sequences']} | {r['right']} | {r['rejected']} | "
                     f"**{r['silently_wrong']}** | {r['kept_inexpressible']} | {r['good_rejected']} ({r['good_rejected_lossless']}) | {why} |")  # fmt: skip
    return "\n".join(lines)


def dict_arguments(row: dict) -> dict:
    """The row with every JSON-string tool-call `arguments` parsed to a dict."""
    row = json.loads(json.dumps(row))
    for side in ("chosen", "rejected"):
        for m in row[side]:
            for call in m.get("tool_calls") or []:
                if isinstance(call["function"]["arguments"], str):
                    call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(ALL_FAMILIES))
    parser.add_argument("--rows", type=int, default=60, help="agent rows per family")
    parser.add_argument("--qa", type=int, default=0, help="one-turn Q/A rows added per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dict-arguments",
        action="store_true",
        help="give mtdpo every tool-call arguments as a dict "
        "(what the oracle renders), to see what is wrong apart from JSON-string arguments",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--work", type=Path, help="keep tokenizers, rows and caches here (default: a temporary directory)"
    )
    args = parser.parse_args()
    rows = agent_rows(args.rows, args.seed) + qa_rows(args.qa, args.seed)
    if args.dict_arguments:
        rows = [dict_arguments(row) for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        results = []
        for family in args.families:
            results.append(check_family(family, rows, work / family))
            print(f"{family}: done", file=sys.stderr)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=dict) + "\n")


if __name__ == "__main__":
    main()
