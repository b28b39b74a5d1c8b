"""Precision: the launcher's choice wins (a contradicting flag is refused), precomputed reference
log-probs carry the precision they were computed in and train refuses another one, and the first
line says what the run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_user_error, invoke, run_preprocess, sample_rows, write_jsonl

import mtdpo.train.config as config

LAUNCHER = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch --mixed_precision X` (or its config file) sets


@pytest.fixture
def cache(tmp_path) -> Path:
    run_preprocess(write_jsonl(tmp_path / "rows.jsonl", sample_rows(8)), tmp_path / "cache")
    return tmp_path / "cache"


def run(cache: Path, out: Path, *extra, env=None):
    return invoke(
        "train",
        "--data",
        cache,
        "--output-dir",
        out,
        "--use-cpu",
        "--max-steps",
        1,
        "--logging-steps",
        1,
        "--report-to",
        "none",
        "--save-strategy",
        "no",
        *extra,
        env=env,
    )


def test_the_launchers_precision_wins_over_the_automatic_choice(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "_has_accelerator", lambda: False)
    args = ["--data", "x", "--output-dir", str(tmp_path), "--use-cpu"]
    monkeypatch.setattr(config, "cpu_has_bf16_matmul", lambda: "amx_bf16")  # auto would be bf16
    monkeypatch.setenv(LAUNCHER, "no")
    parsed = config.parse_train_args(args)
    assert (parsed.bf16, parsed.mixed_precision) == (False, "no")  # what accelerate autocasts, and what mtdpo says
    assert parsed.precision_note == "set by accelerate launch: mixed_precision no"
    monkeypatch.setattr(config, "cpu_has_bf16_matmul", lambda: None)  # auto would be fp32
    monkeypatch.setenv(LAUNCHER, "bf16")
    parsed = config.parse_train_args(args)
    assert (parsed.bf16, parsed.mixed_precision) == (True, "bf16")
    agreeing = config.parse_train_args([*args, "--bf16"])
    assert (agreeing.bf16, agreeing.precision_note) == (True, "set by --bf16")


@pytest.mark.parametrize(
    ("launcher", "flag", "message"),
    [
        (
            "bf16",
            "--no-bf16",
            "--no-bf16 contradicts accelerate launch's mixed_precision bf16 (its --mixed_precision or config file): "
            "drop --no-bf16 (the launcher decides), or launch with --mixed_precision no",
        ),
        (
            "no",
            "--bf16",
            "--bf16 contradicts accelerate launch's mixed_precision no (its --mixed_precision or config file): "
            "drop --bf16 (the launcher decides), or launch with --mixed_precision bf16",
        ),
        (
            "fp16",
            "--output-dir",  # any option: fp16 is refused whatever mtdpo is told
            "accelerate launch set mixed_precision fp16: mtdpo trains in bf16 or fp32; launch with "
            "--mixed_precision bf16 or no",
        ),
    ],
)
def test_a_flag_that_contradicts_the_launcher_is_refused_in_one_line(tmp_path, launcher, flag, message):
    result = invoke(
        "train", "--data", tmp_path, flag, *([tmp_path] if flag == "--output-dir" else []), env={LAUNCHER: launcher}
    )
    assert_user_error(result, message)


def test_precomputed_log_probs_record_their_precision_and_train_refuses_another(cache, tmp_path):
    """The issue's case: the reference precomputed in fp32 (a plain shell), training launched with
    bf16: step 1 was no tie (acc 0.38). Now refused; at the recorded precision step 1 is a tie."""
    result = invoke("precompute-ref", cache, "--no-bf16", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((cache / "manifest.json").read_text())["reference"]["precision"] == "fp32"
    assert_user_error(
        run(cache, tmp_path / "launched", env={LAUNCHER: "bf16"}),
        f"cache {cache} holds reference log-probs computed in fp32, but this run trains in bf16 (set by accelerate "
        f"launch: mixed_precision bf16): step 1 would not start from a tie. Re-run `mtdpo precompute-ref {cache} "
        "--bf16` with this run's other options, or train in fp32",
    )
    assert run(cache, tmp_path / "bf16", "--bf16").exit_code == 2
    result = run(cache, tmp_path / "fp32", "--no-bf16")
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["rewards/margins"], first["rewards/ties"]) == (0.0, 1.0)


def test_bf16_precomputed_log_probs_give_a_tie_at_step_1(cache, tmp_path):
    assert invoke("precompute-ref", cache, "--bf16", "-q").exit_code == 0
    result = run(cache, tmp_path / "bf16", "--bf16")
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["rewards/margins"], first["rewards/ties"]) == (0.0, 1.0)


def test_the_first_line_says_the_precision_the_reference_lora_and_checkpointing(cache, tmp_path):
    result = run(cache, tmp_path / "copy", "--no-bf16")
    first = result.stdout.splitlines()[0]
    assert first.startswith("precision: fp32 (set by --no-bf16); reference: a frozen copy of the policy; ")
    assert "; full fine-tune; activation checkpointing off; " in first
    result = run(cache, tmp_path / "lora", "--no-bf16", "--lora-r", 4, "--activation-checkpointing")
    first = result.stdout.splitlines()[0]
    assert "reference: the policy with its LoRA adapters off; " in first
    assert "; LoRA adapters; activation checkpointing on; " in first
    assert invoke("precompute-ref", cache, "--no-bf16", "-q").exit_code == 0
    first = run(cache, tmp_path / "columns", "--no-bf16").stdout.splitlines()[0]
    assert "reference: precomputed log-probs in the cache; " in first
