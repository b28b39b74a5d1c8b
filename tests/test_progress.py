"""Long phases say where the time goes, on stderr: loading a model, the first step, an eval,
precompute-ref's forward passes; in a log (not a terminal) as lines once a phase has run
progress.DELAY seconds (0 here, so the tiny runs show them); -q silences precompute-ref's."""

from __future__ import annotations

import time

import pytest
from helpers import invoke, run_preprocess, sample_rows, write_jsonl

from mtdpo import progress


@pytest.fixture
def cache(tmp_path):
    run_preprocess(write_jsonl(tmp_path / "rows.jsonl", sample_rows(8)), tmp_path / "cache")
    return tmp_path / "cache"


def labels(stderr: str) -> list[str]:
    return [line.split(":")[0] for line in stderr.splitlines()]


def test_a_blocking_phase_says_it_is_under_way_and_when_it_ended(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY", 0.05)
    with progress.phase("loading a model"):
        time.sleep(0.5)  # nothing advances: the timer speaks
    with progress.phase("quick"):
        pass  # under DELAY: silent
    assert capsys.readouterr().err.splitlines() == [
        "loading a model: 0:00:00 elapsed",
        "loading a model: done in 0:00:00",
    ]


def test_precompute_ref_shows_its_phases_and_q_silences_them(cache, monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    result = invoke("precompute-ref", cache, "--no-bf16", "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert "loading the tiny random model" in labels(result.stderr)
    assert "reference log-probs: 0/8 pairs, 0:00:00 elapsed, eta ?" in result.stderr.splitlines()
    assert result.stderr.splitlines()[-1].startswith("reference log-probs: 8/8 pairs in ")
    result = invoke("precompute-ref", cache, "--no-bf16", "-q")
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout.startswith("stored fp32 reference log-probs")


def test_train_shows_loading_the_first_step_and_eval(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    result = invoke(
        "train",
        "--data",
        cache,
        "--eval-data",
        cache,
        "--output-dir",
        tmp_path / "run",
        "--no-bf16",
        "--use-cpu",
        "--max-steps",
        1,
        "--eval-strategy",
        "steps",
        "--eval-steps",
        1,
        "--per-device-eval-batch-size",
        2,
        "--report-to",
        "none",
    )
    assert result.exit_code == 0, result.output
    shown = labels(result.stderr)
    for label in (
        "loading the tiny random model",
        "loading the reference (a frozen copy of the policy)",
        "step 1 (the first forward and backward)",
        "eval",
    ):
        assert label in shown, result.stderr
    assert result.stderr.splitlines()[-1].startswith("eval: 4/4 batches in ")
