"""The command-line contract (mtdpo.cli): every command's --help, user errors that exit with
code 2 and one line (never a traceback), typo suggestions and shell completion."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from helpers import assert_user_error, invoke, sample_rows, write_jsonl
from typer.main import get_command

from mtdpo.assets import SAMPLE_DATA
from mtdpo.cli import app

OPTIONS = {  # docs/DESIGN.md and docs/CONFIG.md (+ the options the commands document beyond it)
    "preprocess": [
        "--out",
        "--tokenizer",
        "--chat-template",
        "--max-length",
        "--max-chars",
        "--render-timeout",
        "--mask-mode",
        "--user-marker",
        "--end-marker",
        "--num-proc",
        "--strict",
        "--overwrite",
        "--format",
        "--max-shard-size",
        "--quiet",
    ],
    "show-sample": ["--index", "--side", "--tokens", "--search", "--random", "--html", "--json"],
    "stats": ["--json", "--plot"],
    "plot": ["--out"],
}


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
    assert_user_error(
        invoke("preprocess", tmp_path / "nope.jsonl", "--out", tmp_path / "o"),
        f"input not found: {tmp_path / 'nope.jsonl'}",
    )


def test_error_text_with_brackets_is_printed_as_is(tmp_path):
    """Paths are text, not rich markup: "[/v2]" neither vanishes nor crashes the printer."""
    missing = tmp_path / "runs[/v2]" / "x[v1].jsonl"
    assert_user_error(invoke("preprocess", missing), f"input not found: {missing}")


def test_existing_output(tmp_path, cli_cache):
    assert_user_error(
        invoke("preprocess", SAMPLE_DATA, "--out", cli_cache),
        f"output {cli_cache} already exists; pass --overwrite to replace it",
    )


def test_unknown_format(tmp_path):
    assert_user_error(
        invoke("preprocess", SAMPLE_DATA, "--out", tmp_path / "o", "--format", "xml"),
        "unknown format 'xml'; use one of: auto, jsonl, json, parquet, arrow",
    )
    assert_user_error(
        invoke("preprocess", write_jsonl(tmp_path / "rows.txt", sample_rows(1))),
        "unknown format for rows.txt; name it .jsonl/.json/.parquet or pass --format",
    )
    assert not (tmp_path / "o").exists()


def test_bad_index_and_side(cli_cache):
    assert_user_error(
        invoke("show-sample", cli_cache, "--index", 240), f"--index 240 is out of range: {cli_cache} holds 240 pairs"
    )
    assert_user_error(
        invoke("show-sample", cli_cache, "--index", -1), f"--index -1 is out of range: {cli_cache} holds 240 pairs"
    )
    assert_user_error(
        invoke("show-sample", cli_cache, "--side", "both-ways"),
        "--side must be chosen, rejected or both, not 'both-ways'",
    )


def test_show_sample_of_a_non_cache(tmp_path):
    assert_user_error(
        invoke("show-sample", tmp_path),
        f"{tmp_path} is not an mtdpo cache (no manifest.json); run `mtdpo preprocess` first",
    )


def test_strict_names_the_row(tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", [*sample_rows(2), "oops"])
    assert_user_error(
        invoke("preprocess", source, "--out", tmp_path / "o", "--strict", "-q"),
        "row 2: invalid JSON: Expecting value at column 1 (--strict stops at the first bad row)",
    )


def test_installed_entry_point_exits_2_with_one_line(tmp_path):
    """The real console script, in its own process: no traceback, one line on stderr."""
    mtdpo = Path(sys.executable).parent / "mtdpo"
    assert mtdpo.exists(), "the package is not installed in this environment"
    proc = subprocess.run(
        [str(mtdpo), "preprocess", str(tmp_path / "missing.jsonl")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr == f"error: input not found: {tmp_path / 'missing.jsonl'}\n"


def test_unknown_option_is_a_usage_error():
    result = invoke("show-sample", "x", "--colour")
    assert result.exit_code == 2 and "No such option" in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit) and not isinstance(result.exception, click.ClickException)


# ── help, typos, completion ──────────────────────────────────────────────────


def test_every_option_says_what_it_does_and_its_default():
    """Every option of every typer command has a help text and a "[default: …]" in --help
    (flags say "[default: (off)]"; computed defaults are written out)."""
    commands = get_command(app).commands
    assert {"preprocess", "show-sample", "stats", "plot", "train"} <= set(commands)
    for name, command in commands.items():
        if name in ("train", "precompute-ref"):
            continue  # argparse help (the train options), next tests
        options = [p for p in command.params if p.param_type_name == "option" and "--help" not in p.opts]
        assert all(option.help for option in options), name
        flat = " ".join(invoke(name, "--help").stdout.replace("│", " ").split())
        assert flat.count("[default:") == len(options), name


def test_train_help_groups_every_mtdpo_option_on_one_screen():
    """mtdpo's own options first, each in a group with its default; the 400 TrainingArguments
    only through --help-all."""
    from transformers import TrainingArguments

    from mtdpo.train.config import MtdpoConfig
    from mtdpo.train.help import OPTION_GROUPS

    own = {f.name for f in dataclasses.fields(MtdpoConfig)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    grouped = [name for names in OPTION_GROUPS.values() for name in names]
    ungrouped = own - set(grouped)
    assert not ungrouped, f"add {sorted(ungrouped)} to a group of OPTION_GROUPS in mtdpo/train/help.py"
    assert len(grouped) == len(set(grouped))
    result = invoke("train", "--help")
    assert result.exit_code == 0 and "Traceback" not in result.output
    lines = result.stdout.splitlines()
    first_part = lines[: next(i for i, line in enumerate(lines) if "─ Run ─" in line)]  # mtdpo's own groups
    assert len(first_part) <= 50, len(first_part)  # one screen of an 80-column terminal
    for group in OPTION_GROUPS:
        assert f"─ {group} ─" in result.stdout
    for name in grouped:
        assert re.search(rf"│ --{name.replace('_', '-')} .*\[default: ", result.stdout, flags=re.S), name
    assert "mtdpo train --help-all lists them all" in lines[-1]
    assert invoke("train", "-h").stdout == result.stdout


def test_plot_extra_is_named_in_help():
    """`mtdpo[plot]` in help texts: Rich must not eat "[plot]" as markup."""
    assert "mtdpo[plot]" in " ".join(invoke("stats", "--help").stdout.replace("│", " ").split())
    assert "mtdpo[plot]" in " ".join(invoke("plot", "--help").stdout.replace("│", " ").split())
    assert "mtdpo[plot]" in " ".join(invoke("--help", terminal_width=200).stdout.replace("│", " ").split())


def test_train_help_all_gives_every_option_a_default():
    result = invoke("train", "--help-all")
    assert result.exit_code == 0
    blocks = re.split(r"\n  (?=-)", result.stdout.split("options:", 1)[1])[1:]
    assert len(blocks) > 100 and blocks[0].startswith("-h, --help")
    for block in blocks[1:]:
        assert "(default:" in block and block.split("  ", 1)[1].strip(), block
    assert "--nll_coef NLL_COEF, --nll-coef NLL_COEF" in result.stdout


def test_typos_of_commands_and_options_suggest_the_right_one(cli_cache, tmp_path):
    result = invoke("shwo-sample", cli_cache)
    assert result.exit_code == 2 and "No such command 'shwo-sample'. Did you mean 'show-sample'?" in result.output
    result = invoke("stats", cli_cache, "--jsn")
    assert result.exit_code == 2 and "No such option: --jsn" in result.output and "--json" in result.output
    result = invoke("train", "--data", cli_cache, "--bta", "0.2", "--nll-coeff=1", "--zzz", "1")
    assert result.exit_code == 2
    assert (
        result.stderr
        == "error: unknown options: --bta (did you mean --beta?), --nll-coeff (did you mean --nll-coef?), --zzz\n"
    )
    config = tmp_path / "typo.yaml"
    config.write_text("nll_coeff: 0.5\nbeta: 0.2\n")
    result = invoke("train", "--data", cli_cache, "--config", config)
    assert result.stderr == "error: unknown key in the config file: nll_coeff (did you mean nll_coef?)\n"


def test_a_stray_argument_is_named_with_the_option_it_followed(cli_cache):
    """Two caches to --eval-data used to say `error: unknown option: ` with a blank name."""
    result = invoke("train", "--data", cli_cache, "--eval-data", cli_cache, cli_cache)
    assert_user_error(
        result,
        f"unexpected argument '{cli_cache}' after --eval-data {cli_cache}: --eval-data takes one value "
        "(only --data takes several)",
    )
    result = invoke("train", "stray", "--data", cli_cache)
    assert_user_error(
        result, "unexpected argument 'stray': options come as --name VALUE (caches: --data CACHE [CACHE ...])"
    )
    # precompute-ref used to take a second cache as one more --data cache, and leave it untouched
    result = invoke("precompute-ref", cli_cache, "other-cache")
    assert_user_error(
        result,
        f"unexpected argument 'other-cache' after the cache {cli_cache}: precompute-ref takes one cache; "
        "run it once per cache",
    )


def test_trl_names_point_to_mtdpo_options_not_to_lookalikes(cli_cache, tmp_path):
    """A TRL config's rpo_alpha used to be matched to lora_alpha."""
    config = tmp_path / "trl.yaml"
    config.write_text("rpo_alpha: 1.0\nmax_length: 1024\nmax_prompt_length: 512\nmodel_name_or_path: m\nbeta: 0.1\n")
    result = invoke("train", "--data", cli_cache, "--config", config)
    cut = "sequences are cut when the cache is made: `mtdpo preprocess --max-length N`"
    assert_user_error(
        result,
        "unknown keys in the config file: rpo_alpha (TRL's name; mtdpo's is nll_coef: the weight of the NLL term on "
        f"chosen tokens), max_length (TRL's: {cut}), max_prompt_length (TRL's: {cut}, keeping the whole prompt and "
        "cutting the tail), model_name_or_path (TRL's name; mtdpo's is model)",
    )
    result = invoke("train", "--data", cli_cache, "--rpo-alpha", "1")
    assert_user_error(
        result,
        "unknown option: --rpo-alpha (TRL's name; mtdpo's is --nll-coef: the weight of the NLL term on chosen tokens)",
    )


def test_hub_names_without_network_fail_at_once_in_one_line(tmp_path, cli_cache):
    """They used to retry for 24-51 s, then name the hub client's error."""
    advice = "pass a local path"
    result = invoke("preprocess", SAMPLE_DATA, "--tokenizer", "nobody/no-tokenizer", "--out", tmp_path / "c", "-q")
    assert_user_error(
        result,
        f"no network: tokenizer nobody/no-tokenizer is not a local path nor in the local hub cache, and HF_HUB_OFFLINE is set; {advice}",
    )
    result = invoke("train", "--data", cli_cache, "--model", "nobody/no-model", "--output-dir", tmp_path / "run")
    assert_user_error(
        result,
        f"no network: model nobody/no-model is not a local path nor in the local hub cache, and HF_HUB_OFFLINE is set; {advice}",
    )
    # Offline mode not set, the hub's endpoint refusing connections: the probe answers, no retries.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1]), "HF_ENDPOINT": "http://127.0.0.1:1"}
    command = [sys.executable, "-m", "mtdpo", "preprocess", "nobody/no-data", "--out", str(tmp_path / "d"), "-q"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        f"error: no network: input nobody/no-data is not a local path, and 127.0.0.1 cannot be reached "
        f"(Connection refused); {advice}\n"
    )


def test_shell_completion_of_commands_and_options():
    """typer's completion: what `mtdpo --install-completion` wires into bash, run directly."""
    mtdpo = Path(sys.executable).parent / "mtdpo"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "_MTDPO_COMPLETE": "complete_bash"}

    def complete(words: str) -> list[str]:
        args = {"COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        proc = subprocess.run([str(mtdpo)], env={**env, **args}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert complete("mtdpo s") == ["show-sample", "stats"]
    assert complete("mtdpo show-sample data_cache/x --s") == ["--side", "--search"]
    assert "--install-completion" in invoke("--help").stdout and "--show-completion" in invoke("--help").stdout


def test_precompute_ref_help_lists_the_train_options_it_reads():
    from mtdpo.train.help import PRECOMPUTE_OPTIONS

    flat = " ".join(invoke("precompute-ref", "--help").stdout.replace("│", " ").split())
    assert flat.startswith("Usage: mtdpo precompute-ref CACHE [OPTIONS]")
    for name in PRECOMPUTE_OPTIONS:
        assert f"--{name.replace('_', '-')}" in flat, name
    assert flat.count("[default:") == len(PRECOMPUTE_OPTIONS)


def test_precompute_ref_takes_train_options_and_says_what_it_stored(tmp_path):
    import json
    import shutil

    from helpers import run_preprocess

    cache = tmp_path / "cache"
    run_preprocess(write_jsonl(tmp_path / "rows.jsonl", sample_rows(6)), cache)
    result = invoke("precompute-ref", cache, "--batch-size", "4", "--no-bf16", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"stored fp32 reference log-probs of tiny random Gemma (seeded) in {cache}"
    reference = json.loads((cache / "manifest.json").read_text())["reference"]
    assert (reference["seed"], reference["precision"], reference["path"]) == (7, "fp32", None)
    assert_user_error(
        invoke("precompute-ref", "--seed", "7", cache),
        "precompute-ref takes the cache first: mtdpo precompute-ref CACHE [options]",
    )
    assert_user_error(
        invoke("precompute-ref", tmp_path / "nope"),
        f"{tmp_path / 'nope'} is not an mtdpo cache (no manifest.json); run `mtdpo preprocess` first",
    )
    shutil.rmtree(cache / "reference")  # the files checksums.json lists are gone: refused, not recomputed over
    result = invoke("precompute-ref", cache)
    assert result.exit_code == 2 and "is missing (listed in checksums.json)" in result.stderr
