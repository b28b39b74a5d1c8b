"""The command line (mtdpo.cli): preprocess then show-sample, --help, and user errors that
exit with code 2 and one line, never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import datasets
import pytest
from conftest import IGNORE, decoded_runs, embedded_tokenizer, sample_rows, write_jsonl
from typer.main import get_command
from typer.testing import CliRunner

from mtdpo.cli import app
from mtdpo.tokenizer import SAMPLE_DATA

runner = CliRunner()
INDEX = 3  # a sample pair with several assistant turns on both sides


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, message: str) -> None:
    """Exit code 2, one line on stderr naming the problem, nothing on stdout, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {message}"
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "demo"
    result = invoke("preprocess", SAMPLE_DATA, "--out", out)
    assert result.exit_code == 0, result.output
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.stdout.splitlines() if "│" in line]
    summary = dict(cells)
    assert (summary["rows"], summary["kept"], summary["rejected"], summary["truncated"]) == ("240", "240", "0", "0")
    return out


def test_show_sample_plain_brackets_the_trained_text(cli_cache):
    result = invoke("show-sample", cli_cache, "--index", INDEX)
    assert result.exit_code == 0, result.output
    text = result.stdout
    record = datasets.load_from_disk(str(cli_cache))[INDEX]
    row = sample_rows()[record["row"]]
    assert text.startswith(f"pair {INDEX} (source row {record['row']}), shared prompt {record['prompt_len']} tokens; trained text is [[bracketed]]\n")
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


OPTIONS = {  # DESIGN.md, "CLI contract" (+ the options the commands document beyond it)
    "preprocess": ["--out", "--tokenizer", "--chat-template", "--max-length", "--mask-mode", "--user-marker",
                   "--end-marker", "--num-proc", "--strict", "--overwrite", "--format", "--max-shard-size", "--quiet"],
    "show-sample": ["--index", "--side", "--json"],
}  # fmt: skip


@pytest.mark.parametrize("command", list(OPTIONS))
def test_help_lists_every_option(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    documented = {opt for param in get_command(app).commands[command].params for opt in param.opts}
    assert set(OPTIONS[command]) <= documented
    for option in documented | {"--help"}:
        if option.startswith("--"):
            assert option in result.stdout, option


def test_preprocess_help_shows_the_bracketed_defaults():
    """Help texts hold "[default: …]" for options whose default is computed: shown, not eaten as markup."""
    result = invoke("preprocess", "--help")
    flat = " ".join(result.stdout.replace("│", " ").split())
    for default in ("data_cache/<input", "the embedded tiny", "from the template"):
        assert f"[default: {default}" in flat


def test_missing_input_file(tmp_path):
    assert_user_error(invoke("preprocess", tmp_path / "nope.jsonl", "--out", tmp_path / "o"),
                      f"input not found: {tmp_path / 'nope.jsonl'}")  # fmt: skip


def test_error_text_with_brackets_is_printed_as_is(tmp_path):
    """Paths are text, not rich markup: "[/v2]" neither vanishes nor crashes the printer."""
    missing = tmp_path / "runs[/v2]" / "x[v1].jsonl"
    assert_user_error(invoke("preprocess", missing), f"input not found: {missing}")


def test_existing_output(tmp_path, cli_cache):
    assert_user_error(invoke("preprocess", SAMPLE_DATA, "--out", cli_cache),
                      f"output {cli_cache} already exists; pass --overwrite to replace it")  # fmt: skip


def test_unknown_format(tmp_path):
    assert_user_error(invoke("preprocess", SAMPLE_DATA, "--out", tmp_path / "o", "--format", "xml"),
                      "unknown format 'xml'; use one of: auto, jsonl, json, parquet, arrow")  # fmt: skip
    assert_user_error(invoke("preprocess", write_jsonl(tmp_path / "rows.txt", sample_rows(1))),
                      "unknown format for rows.txt; name it .jsonl/.json/.parquet or pass --format")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_bad_index_and_side(cli_cache):
    assert_user_error(invoke("show-sample", cli_cache, "--index", 240), f"--index 240 is out of range: {cli_cache} holds 240 pairs")
    assert_user_error(invoke("show-sample", cli_cache, "--index", -1), f"--index -1 is out of range: {cli_cache} holds 240 pairs")
    assert_user_error(invoke("show-sample", cli_cache, "--side", "both-ways"), "--side must be chosen, rejected or both, not 'both-ways'")


def test_show_sample_of_a_non_cache(tmp_path):
    assert_user_error(invoke("show-sample", tmp_path),
                      f"{tmp_path} is not an mtdpo cache (no manifest.json); run `mtdpo preprocess` first")  # fmt: skip


def test_strict_names_the_row(tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", [*sample_rows(2), "oops"])
    assert_user_error(invoke("preprocess", source, "--out", tmp_path / "o", "--strict", "-q"),
                      "row 2: invalid JSON: Expecting value at column 1 (--strict stops at the first bad row)")  # fmt: skip


def test_installed_entry_point_exits_2_with_one_line(tmp_path):
    """The real console script, in its own process: no traceback, one line on stderr."""
    mtdpo = Path(sys.executable).parent / "mtdpo"
    assert mtdpo.exists(), "the package is not installed in this environment"
    proc = subprocess.run([str(mtdpo), "preprocess", str(tmp_path / "missing.jsonl")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr == f"error: input not found: {tmp_path / 'missing.jsonl'}\n"


def test_unknown_option_is_a_usage_error():
    result = invoke("show-sample", "x", "--colour")
    assert result.exit_code == 2 and "No such option" in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit) and not isinstance(result.exception, click.ClickException)
