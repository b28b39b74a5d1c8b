"""Malformed input: every fault of tests/data/faults.jsonl (written by tests/data/make_faults.py)
gets its expected outcome, no row is lost, the good rows come out exactly as without the bad
ones, templates run sandboxed, and every command-line mistake is one line with exit code 2."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
import transformers
from helpers import TESTS, cache_dataset, hidden_leftovers, run_preprocess, sample_rows, write_jsonl
from typer.testing import CliRunner

from mtdpo.assets import EMBEDDED_TOKENIZER, SAMPLE_DATA
from mtdpo.cli import app
from mtdpo.errors import UsageError
from mtdpo.preprocess import pipeline

DATA = TESTS / "data"
TEMPLATES = TESTS / "templates"
PACKAGED = ", ".join(sorted(p.stem for p in (TESTS.parent / "mtdpo" / "assets" / "templates").glob("*.jinja")))
GEMMA2 = TEMPLATES / "gemma.jinja"  # the real Gemma-2 template: it raises on roles it refuses
COUNTS = ("rows", "kept", "rejected", "dropped", "truncated")
USED = ("kept", "truncated")
runner = CliRunner()
# transformers' log handler keeps the stderr it first saw: let that be the real one, not a
# CliRunner buffer that is closed after its command ("--- Logging error ---" in later output).
transformers.logging.set_verbosity_warning()


def expected(corpus: str) -> list[dict]:
    return json.loads((DATA / f"{corpus}.expected.json").read_text())


def rejects(cache: Path) -> list[dict]:
    return [json.loads(line) for line in (cache / "rejects.jsonl").read_text().splitlines()]


def without_row(cache: Path) -> pa.Table:
    table = pa.concat_tables(
        pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in sorted(cache.glob("data-*.arrow"))
    )
    return table.drop(["row"])


def raw_lines(corpus: str) -> list[bytes]:
    return (DATA / f"{corpus}.jsonl").read_bytes().split(b"\n")


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """The corpus through the command line (summary table included): (cache, CLI result)."""
    out = tmp_path_factory.mktemp("faults") / "cache"
    result = runner.invoke(app, ["preprocess", str(DATA / "faults.jsonl"), "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    return out, result


# ── the corpus ────────────────────────────────────────────────────────────────


def test_the_corpus_is_what_make_faults_writes(tmp_path):
    """The committed files are reproducible from the script."""
    shutil.copy(DATA / "make_faults.py", tmp_path)
    subprocess.run([sys.executable, str(tmp_path / "make_faults.py")], check=True, capture_output=True)
    for name in ("faults.jsonl", "faults.expected.json", "gemma2_faults.jsonl", "gemma2_faults.expected.json"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    for name in ("raises.jinja", "escape.jinja"):
        assert (tmp_path / "templates" / name).read_bytes() == (DATA / "templates" / name).read_bytes(), name


def test_the_reliability_doc_lists_every_fault():
    """docs/RELIABILITY.md's fault tables are the expectations (python tests/data/make_faults.py --doc)."""
    spec = importlib.util.spec_from_file_location("make_faults", DATA / "make_faults.py")
    make_faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_faults)
    assert make_faults.markdown() in make_faults.DOC.read_text(), "run: python tests/data/make_faults.py --doc"


def test_the_corpus_covers_71_distinct_faults():
    faults = {
        e["fault"] for e in expected("faults") + expected("gemma2_faults") if not e["fault"].startswith("good row")
    }
    outcomes = [e["outcome"] for e in expected("faults") if not e["fault"].startswith("good row")]
    # 67 between good rows, the cut-off last line, 5 run with the Gemma-2 template (2 names shared)
    assert len(faults) == 71
    assert {o: outcomes.count(o) for o in set(outcomes)} == {
        "rejected": 49,
        "kept": 15,
        "truncated": 1,
        "dropped": 1,
        "skipped": 2,
    }


# ── every fault, every good row ───────────────────────────────────────────────


def test_every_fault_gets_its_expected_outcome(faults):
    cache, _ = faults
    want = expected("faults")
    assert rejects(cache) == [
        {"row": e["row"], "reason": e["reason"]} for e in want if e["outcome"] in ("rejected", "dropped")
    ]
    assert list(cache_dataset(cache)["row"]) == [e["row"] for e in want if e["outcome"] in USED]
    truncated = [e["row"] for e in want if e["outcome"] == "truncated"]
    ds = cache_dataset(cache)
    lengths = {r: (c, j) for r, c, j in zip(ds["row"], ds["chosen_len"], ds["rejected_len"])}
    assert [r for r, lens in lengths.items() if max(lens) == 2048] == truncated


def test_no_row_is_lost(faults):
    """Each non-blank line is in the shards or in rejects.jsonl, exactly once."""
    cache, _ = faults
    rows = [e["row"] for e in expected("faults") if e["outcome"] != "skipped"]
    placed = list(cache_dataset(cache)["row"]) + [r["row"] for r in rejects(cache)]
    assert sorted(placed) == rows and len(rows) == 134


def test_counts_in_stats_manifest_and_summary(faults):
    cache, result = faults
    stats = json.loads((cache / "stats.json").read_text())
    counts = {"rows": 134, "kept": 84, "rejected": 49, "dropped": 1, "truncated": 1}
    assert {k: stats[k] for k in COUNTS} == counts
    assert json.loads((cache / "manifest.json").read_text())["counts"] == counts
    assert sum(stats["reasons"].values()) == 50 and stats["reasons"]["invalid JSON"] == 7
    for name, value in counts.items():
        assert re.search(rf"│ {name} +│ +{value} │", result.stdout), name
    assert "[/bold]" in result.stdout  # the role from the data is printed as text, not read as markup


def test_good_rows_come_out_as_if_the_bad_rows_were_absent(faults, tmp_path):
    cache, _ = faults
    lines = raw_lines("faults")
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(lines[e["row"]] for e in expected("faults") if e["outcome"] in USED) + b"\n")
    run_preprocess(good, tmp_path / "good")
    assert list(cache_dataset(tmp_path / "good")["row"]) == list(range(84))
    assert without_row(tmp_path / "good").equals(without_row(cache))


def test_chunks_and_workers_do_not_change_the_outcome(faults, tmp_path, monkeypatch):
    """Chunks of 16 rows over 2 worker processes: faults land in every chunk and worker."""
    cache, _ = faults
    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 16)
    run_preprocess(DATA / "faults.jsonl", tmp_path / "p2", num_proc=2)
    assert rejects(tmp_path / "p2") == rejects(cache)
    for shard in cache.glob("data-*.arrow"):
        assert (tmp_path / "p2" / shard.name).read_bytes() == shard.read_bytes()


def test_strict_stops_at_the_first_bad_row(tmp_path):
    first = next(e for e in expected("faults") if e["outcome"] == "rejected")
    assert (first["row"], first["fault"]) == (1, "invalid JSON")
    result = runner.invoke(app, ["preprocess", str(DATA / "faults.jsonl"), "--out", str(tmp_path / "out"), "--strict"])
    assert result.exit_code == 2
    assert (
        result.stderr
        == "error: row 1: invalid JSON: Expecting value at column 13 (--strict stops at the first bad row)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ── templates ─────────────────────────────────────────────────────────────────


def test_the_templates_own_errors_are_the_reasons(tmp_path):
    """Gemma-2 refuses a system role and turns that do not alternate: its message is the reason."""
    stats = run_preprocess(DATA / "gemma2_faults.jsonl", tmp_path / "out", chat_template=GEMMA2)
    want = expected("gemma2_faults")
    assert rejects(tmp_path / "out") == [
        {"row": e["row"], "reason": e["reason"]} for e in want if e["outcome"] == "rejected"
    ]
    assert (
        list(cache_dataset(tmp_path / "out")["row"])
        == [e["row"] for e in want if e["outcome"] == "kept"]
        == [0, 2, 4, 6, 8, 10]
    )
    assert {k: stats[k] for k in COUNTS} == {"rows": 11, "kept": 6, "rejected": 5, "dropped": 0, "truncated": 0}


def test_a_template_that_raises_rejects_only_its_rows(tmp_path):
    rows = sample_rows(3)
    forbidden = {
        "chosen": [{"role": "user", "content": "Say FORBIDDEN."}, {"role": "assistant", "content": "No."}],
        "rejected": [{"role": "user", "content": "Say FORBIDDEN."}, {"role": "assistant", "content": "FORBIDDEN"}],
    }
    source = write_jsonl(tmp_path / "rows.jsonl", [rows[0], forbidden, rows[1], rows[2]])
    stats = run_preprocess(source, tmp_path / "out", chat_template=DATA / "templates" / "raises.jinja")
    assert (stats["kept"], stats["rejected"]) == (3, 1)
    assert rejects(tmp_path / "out") == [
        {"row": 1, "reason": "chat template error: this template refuses the word FORBIDDEN"}
    ]


def test_a_template_cannot_leave_the_sandbox(tmp_path):
    """transformers renders templates in jinja2's ImmutableSandboxedEnvironment: the classic
    injection (reach `os` through a function's __globals__) is a template error, not a shell."""
    marker = Path("/tmp/mtdpo-sandbox-escaped")
    marker.unlink(missing_ok=True)
    reason = "chat template error: access to attribute '__init__' of 'type' object is unsafe."
    with pytest.raises(UsageError, match=re.escape(f"row 0: {reason} (--strict stops at the first bad row)")):
        run_preprocess(
            write_jsonl(tmp_path / "rows.jsonl", sample_rows(3)),
            tmp_path / "out",
            chat_template=DATA / "templates" / "escape.jinja",
            strict=True,
        )
    assert not marker.exists()


def test_input_data_is_never_executed_or_unpickled(faults, monkeypatch, tmp_path):
    """Jinja and a pickle payload in the content are text: their exact characters are in the
    tokens, and nothing is unpickled while preprocessing or opening the cache."""
    cache, _ = faults

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    by_fault = {e["fault"]: e["row"] for e in expected("faults")}
    run_preprocess(DATA / "faults.jsonl", tmp_path / "again")
    ds = cache_dataset(tmp_path / "again", verify=True)
    monkeypatch.undo()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cache / "tokenizer"))
    pairs = {row: i for i, row in enumerate(ds["row"])}
    jinja = tok.decode(ds[pairs[by_fault["Jinja code in content is text"]]]["chosen_input_ids"])
    assert "{{ raise_exception('pwned') }}{% for x in range(10**9) %}x{% endfor %}{{ ''.__class__.__mro__ }}" in jinja
    pickled = ds[pairs[by_fault["a pickle payload in content is text"]]]
    trained = [t for t, label in zip(pickled["chosen_input_ids"], pickled["chosen_labels"]) if label != -100]
    assert tok.decode(trained) == "cos\nsystem\n(S'touch /tmp/mtdpo-pwned'\ntR.<end_of_turn>"
    assert not Path("/tmp/mtdpo-pwned").exists()


# ── the command line: one line, exit code 2 ───────────────────────────────────


def cli_error(tmp_path: Path, *args: str) -> str:
    result = runner.invoke(app, ["preprocess", *map(str, args)], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ").replace(str(tmp_path), "TMP")


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sample = shutil.copy(SAMPLE_DATA, tmp_path / "rows.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_bytes(b"\xef\xbb\xbf\n  \r\n\n")
    shutil.copy(SAMPLE_DATA, tmp_path / "rows.txt")
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "exists").mkdir()
    no_template = shutil.copytree(EMBEDDED_TOKENIZER, tmp_path / "no-template")
    (no_template / "chat_template.jinja").unlink()
    (tmp_path / "syntax.jinja").write_text("{% for m in messages %}{{ m.content }")
    cases = {
        ("missing.jsonl",): "input not found: missing.jsonl",
        ("folder.jsonl",): "folder.jsonl is a directory but not a saved `datasets` dataset (no state.json)",
        ("folder.jsonl", "--format", "jsonl", "--out", "x"): "folder.jsonl is a directory; --format jsonl reads a file",
        (sample, "--format", "arrow"): "TMP/rows.jsonl is a file; --format arrow reads a saved `datasets` directory",
        ("rows.txt",): "unknown format for rows.txt; name it .jsonl/.json/.parquet or pass --format",
        (sample, "--format", "xml"): "unknown format 'xml'; use one of: auto, jsonl, json, parquet, arrow",
        ("empty.jsonl",): "input empty.jsonl holds no rows",
        ("blank.jsonl",): "input blank.jsonl holds no rows",
        ("broken.parquet",): "broken.parquet is not a readable parquet file (Parquet magic bytes not found in footer. "
        "Either the file is corrupted or this is not a parquet file.)",
        (sample, "--out", "exists"): "output exists already exists; pass --overwrite to replace it",
        (
            sample,
            "--tokenizer",
            "no/such-tokenizer",
        ): "no network: tokenizer no/such-tokenizer is not a local path nor in the local hub cache, and HF_HUB_OFFLINE "
        "is set; pass a local path",
        (
            sample,
            "--chat-template",
            "nope.jinja",
        ): f"chat template not found: nope.jinja is neither a file nor a packaged template ({PACKAGED})",
        (
            sample,
            "--tokenizer",
            no_template,
        ): f"TMP/no-template has no chat template; pass one with --chat-template FILE or NAME ({PACKAGED})",
        (
            sample,
            "--chat-template",
            "syntax.jinja",
        ): "the chat template of syntax.jinja does not compile: unexpected '}' (line 1)",
        (sample, "--max-length", "0"): "--max-length must be at least 1",
        (sample, "--num-proc", "0"): "--num-proc must be at least 1",
        (sample, "--mask-mode", "all"): "unknown --mask-mode 'all'; use assistant or seed",
    }
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args, message in cases.items():
        assert cli_error(tmp_path, *args) == message, args
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in (tmp_path / "exists").iterdir()] == []


def test_an_unreadable_input_is_one_line(tmp_path):
    """Permissions: root reads anything, so as root the command runs without CAP_DAC_OVERRIDE."""
    source = shutil.copy(SAMPLE_DATA, tmp_path / "rows.jsonl")
    os.chmod(source, 0)
    command = [str(Path(sys.executable).parent / "mtdpo"), "preprocess", str(source), "--out", str(tmp_path / "out")]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *command]
    proc = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"error: cannot read {source}: Permission denied\n"
    assert not (tmp_path / "out").exists()


def test_a_damaged_dataset_directory_is_one_line(tmp_path):
    datasets.Dataset.from_list(sample_rows(3)).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "ds" / "state.json").write_text("{")
    message = cli_error(tmp_path, tmp_path / "ds")
    assert message.startswith("cannot open TMP/ds as a saved `datasets` dataset: JSONDecodeError")


def test_corrupt_json_list_is_one_line(tmp_path):
    (tmp_path / "rows.json").write_text('[{"chosen": ')
    assert cli_error(tmp_path, tmp_path / "rows.json") == (
        "TMP/rows.json is not valid JSON (Expecting value: line 1 column 13 (char 12)); for one object per line name it .jsonl"
    )


def test_usage_errors_leave_nothing_behind(tmp_path):
    with pytest.raises(UsageError):
        run_preprocess(DATA / "faults.jsonl", tmp_path / "out", strict=True)
    assert hidden_leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
