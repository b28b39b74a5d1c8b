"""Training output: the final summary line of `mtdpo train`, runs/NAME/metrics.jsonl, and
`mtdpo plot` drawing loss, margins and accuracy from it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtdpo.cli import app
from mtdpo.plot import read_metrics

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def step(n: int, loss: float, margin: float, accuracy: float, **extra) -> dict:
    return {
        "step": n,
        "loss": loss,
        "dpo_loss": loss / 2,
        "nll": loss / 2,
        "rewards/chosen": margin,
        "rewards/rejected": 0.0,
        "rewards/margins": margin,
        "rewards/accuracies": accuracy,
        "tokens_per_second": 1000.0,
        **extra,
    }


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run resumed from step 10: steps 15 and 20 were logged twice, the later lines win."""
    lines = [
        step(5, 2.0, 0.1, 0.5),
        step(10, 1.5, 0.8, 0.75),
        {"step": 10, "eval_loss": 1.7, "eval_rewards/margins": 0.5, "eval_rewards/accuracies": 0.6},
        step(15, 9.9, 9.9, 0.0),
        step(20, 9.9, 9.9, 0.0),
        step(15, 1.2, 1.5, 0.9),
        step(20, 1.0, 2.0, 1.0),
        {"step": 20, "train_runtime": 12.5, "train_loss": 1.4},
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_read_metrics_keeps_the_last_line_of_each_step(run_dir):
    train, evals = read_metrics(run_dir)
    assert [(e["step"], e["loss"], e["rewards/margins"]) for e in train] == [
        (5, 2.0, 0.1),
        (10, 1.5, 0.8),
        (15, 1.2, 1.5),
        (20, 1.0, 2.0),
    ]
    assert [(e["step"], e["eval_loss"]) for e in evals] == [(10, 1.7)]
    assert read_metrics(run_dir / "metrics.jsonl") == (train, evals)  # the file itself works too


def test_plot_command_draws_the_curves(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    result = invoke("plot", run_dir)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {run_dir / 'curves.png'}: margin +0.100 → +2.000, accuracy 0.50 → 1.00\n"
    assert png_size(run_dir / "curves.png") == (1600, 450)
    out = tmp_path / "elsewhere.png"
    assert invoke("plot", run_dir, "--out", out).exit_code == 0 and png_size(out) == (1600, 450)


def test_plot_errors(tmp_path, run_dir, monkeypatch):
    result = invoke("plot", tmp_path)
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"error: no metrics file at {tmp_path / 'metrics.jsonl'}; `mtdpo train --output-dir {tmp_path}` writes it\n"
    )
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "train_runtime": 1.0, "train_loss": 1.0}\n')
    result = invoke("plot", tmp_path)
    assert (
        result.stderr
        == f"error: {tmp_path / 'metrics.jsonl'} holds no training step yet (a line is written every --logging-steps)\n"
    )
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{oops\n')
    assert invoke("plot", tmp_path).stderr == f"error: {tmp_path / 'metrics.jsonl'}, line 2: not JSON\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("plot", run_dir)
    assert result.exit_code == 2 and result.stderr == "error: plotting needs matplotlib: pip install 'mtdpo[plot]'\n"


def test_a_last_line_cut_off_by_a_kill_is_skipped_with_a_note(run_dir, tmp_path):
    """A run killed while writing metrics.jsonl leaves half a line without a newline: before, the
    whole file was refused. A bad line in the middle, or a complete bad last line, still is."""
    pytest.importorskip("matplotlib")
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 25, "loss": 0.9, "rewa')
    result = invoke("plot", run_dir)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {run_dir / 'curves.png'}: margin +0.100 → +2.000, accuracy 0.50 → 1.00\n"
    assert result.stderr == f"note: {metrics}, line 9: skipped, cut off (the run was stopped while writing it)\n"
    metrics.write_text(metrics.read_text() + "\n")  # the same line, complete: not a cut
    assert invoke("plot", run_dir).stderr == f"error: {metrics}, line 9: not JSON\n"
    metrics.write_text('{"step": 1, "loss": 1.0}\n{oops\n{"step": 2, "loss": 0.5}')
    assert invoke("plot", run_dir).stderr == f"error: {metrics}, line 2: not JSON\n"


@pytest.mark.slow
def test_a_real_run_writes_metrics_then_plots(tmp_path, capsys):
    """End to end on the tiny model: metrics.jsonl, the summary line agreeing with it, the plot."""
    pytest.importorskip("matplotlib")
    from trainkit import make_cache, short_run

    from mtdpo.train.run import train

    cache = make_cache(tmp_path, n=8)
    train(short_run(cache, tmp_path / "run", max_steps=3, bf16=None))
    steps, _ = read_metrics(tmp_path / "run")
    assert [e["step"] for e in steps] == [1, 2, 3]
    first, last = steps[0], steps[-1]
    done = capsys.readouterr().out.splitlines()[-1]
    from mtdpo.train.callbacks import accuracy

    assert first["rewards/ties"] == 1.0 and accuracy(first) == "tie"  # step 1: the policy is still its reference
    trend = f"margin {first['rewards/margins']:+.3f} → {last['rewards/margins']:+.3f}, acc {accuracy(first)} → {accuracy(last)}"
    expected = rf"done: 3 steps in 0:00:\d\d, mean loss \d+\.\d{{4}}, {re.escape(trend)}, [\d,]+ tok/s"
    assert re.fullmatch(expected, done), done
    result = invoke("plot", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "run" / "curves.png") == (1600, 450)


def test_a_kto_run_plots_its_kl_instead_of_an_accuracy(tmp_path):
    pytest.importorskip("matplotlib")
    lines = [
        {"step": n, "loss": 0.5 - n / 100, "kto_loss": 0.5 - n / 100, "nll": 0.0, "kl": n / 10,
         "rewards/chosen": n / 50, "rewards/rejected": -n / 50, "rewards/margins": n / 25}
        for n in (1, 2, 3)
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = invoke("plot", tmp_path, "--out", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {tmp_path / 'c.png'}: margin +0.040 → +0.120, kl 0.100 → 0.300"
    assert png_size(tmp_path / "c.png") == (1600, 450)


def test_a_tie_is_drawn_as_a_tie_not_as_accuracy_0(tmp_path):
    """Step 1 (and the first eval) of a run whose policy is its reference: every margin 0, so
    accuracy (margins > 0) is 0.00; the plot draws a tie marker at 0.5 and says "tie"."""
    from mtdpo.plot import TIE, curve

    pytest.importorskip("matplotlib")
    lines = [
        step(1, 2.0, 0.0, 0.0, **{"rewards/ties": 1.0}),
        {"step": 1, "eval_loss": 2.0, "eval_rewards/accuracies": 0.0, "eval_rewards/ties": 1.0},
        step(2, 1.5, 0.5, 0.0, **{"rewards/ties": 0.5}),  # half the margins 0, none > 0: 0.00, not a tie
        step(3, 1.0, 2.0, 1.0, **{"rewards/ties": 0.0}),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    train, evals = read_metrics(tmp_path)
    assert curve(train, "rewards/accuracies") == ([(2, 0.0), (3, 1.0)], [1])
    assert curve(evals, "rewards/accuracies", "eval_") == ([], [1])
    assert curve(train, "rewards/margins") == ([(1, 0.0), (2, 0.5), (3, 2.0)], [])
    assert TIE == 0.5
    result = invoke("plot", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("margin +0.000 → +2.000, accuracy tie → 1.00\n")
