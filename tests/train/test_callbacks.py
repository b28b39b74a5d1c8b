"""What `mtdpo train` prints: one line per logging step, eval progress (stderr) whose time stays
out of the ETA and tokens/s, ties shown as ties, and the summary line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mtdpo.train import callbacks


@pytest.fixture
def clock(monkeypatch):
    now = SimpleNamespace(t=100.0)
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now.t)
    return now


def step_logs(margin: float, accuracy: float, tokens_per_second: float, **extra) -> dict:
    return {
        "loss": 1.0,
        "dpo_loss": 0.5,
        "nll": 0.5,
        "rewards/margins": margin,
        "rewards/accuracies": accuracy,
        "tokens_per_second": tokens_per_second,
        **extra,
    }


def test_summary_reports_first_and_last_margin_accuracy_and_tokens_per_second(clock, capsys):
    line = callbacks.ProgressLine()
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=10)
    line.on_train_begin(None, state, None)
    line.on_step_end(None, state, None)
    for state.global_step, clock.t, tokens_per_second, margin, accuracy in (
        (5, 102.0, 1000.0, 0.1, 0.5),
        (10, 106.0, 500.0, 2.0, 1.0),
    ):
        line.on_log(None, state, None, logs=step_logs(margin, accuracy, tokens_per_second))
    line.on_log(None, state, None, logs={"train_runtime": 6.2, "train_loss": 1.2345})
    printed = capsys.readouterr().out.splitlines()
    assert (
        printed[0]
        == "step  5/10  loss 1.0000  dpo 0.5000  nll 0.5000  margin +0.100  acc 0.50  1,000 tok/s  eta 0:00:02"
    )
    # tokens: 1000/s over the first 2 s + 500/s over the next 4 s = 4000 in 6 s
    assert (
        printed[-1] == "done: 10 steps in 0:00:06, mean loss 1.2345, margin +0.100 → +2.000, acc 0.50 → 1.00, 667 tok/s"
    )


def test_eval_time_is_left_out_of_eta_and_tokens_per_second(clock, capsys):
    """Steps 1-2 train for 2 s, an eval of 3 batches takes 100 s, steps 3-4 train for 2 s: the ETA
    at step 2 is 2 s (not 102 s) and the summary's tokens/s is over the 4 training seconds."""
    line = callbacks.ProgressLine()
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=4)
    line.on_train_begin(None, state, None)
    line.on_step_end(None, state, None)
    state.global_step, clock.t = 2, 102.0
    line.on_log(None, state, None, logs=step_logs(0.1, 0.5, 100.0))
    loader = [0, 1, 2]
    for clock.t in (110.0, 150.0, 202.0):
        line.on_prediction_step(None, state, None, eval_dataloader=loader)
    line.on_evaluate(None, state, None)
    line.on_log(
        None,
        state,
        None,
        logs={"eval_loss": 0.7, "eval_rewards/margins": 0.0, "eval_rewards/accuracies": 0.0, "eval_rewards/ties": 1.0},
    )
    state.global_step, clock.t = 4, 204.0
    line.on_log(None, state, None, logs=step_logs(0.3, 1.0, 100.0))
    line.on_log(None, state, None, logs={"train_runtime": 104.0, "train_loss": 1.0})
    captured = capsys.readouterr()
    printed = captured.out.splitlines()
    assert printed[0].endswith("100 tok/s  eta 0:00:02")
    assert printed[1] == "eval  loss 0.7000  margin +0.000  acc tie"
    assert printed[-1].endswith("acc 0.50 → 1.00, 100 tok/s")
    # stderr (a log, not a terminal): the eval's progress once it has run 2 s, then every 10 s, and its end
    assert captured.err.splitlines() == [
        "eval: 2/3 batches, 0:00:40 elapsed, eta 0:00:20",
        "eval: 3/3 batches, 0:01:32 elapsed, eta 0:00:00",
        "eval: 3/3 batches in 0:01:32",
    ]


def test_accuracy_of_exact_ties_reads_tie():
    assert callbacks.accuracy({"rewards/accuracies": 0.0, "rewards/ties": 1.0}) == "tie"
    assert callbacks.accuracy({"rewards/accuracies": 0.0, "rewards/ties": 0.5}) == "0.00"
    assert callbacks.accuracy({"eval_rewards/accuracies": 0.75}, "eval_") == "0.75"
