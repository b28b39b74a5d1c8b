"""What a training run prints and writes as it goes: one line per logging step, progress
(mtdpo/progress.py) through the first step and while evaluating, a summary at the end, and
metrics.jsonl (main process only)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from transformers import TrainerCallback

from mtdpo.plot import is_tie
from mtdpo.progress import clock, phase

NAN = float("nan")


class MetricsFile(TrainerCallback):
    """Append every log line to <output_dir>/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step == 0:  # a fresh run, not a resume
            self.path.unlink(missing_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class ProgressLine(TrainerCallback):
    """A header (KTO: the class weights' advice), one compact line per logging step (loss, margins,
    accuracy, tokens/s, MFU, ETA) and a summary.

    The first step and each evaluation show their progress on stderr; an eval's time is left out of the ETA and of the
    tokens/s (both are about training: an eval of 20 pairs on CPU takes minutes)."""

    def __init__(self, header: str = ""):
        self.header = header

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step
        # For the summary: the first and last logged steps, tokens ≈ Σ tokens/s × interval, and the same for MFU.
        self.first_log = self.last_log = None
        self.tokens, self.mfu_seconds, self.last_time = 0.0, 0.0, self.started
        if state.is_world_process_zero and self.header:
            print(self.header, flush=True)
        nothing_to_train = state.global_step >= state.max_steps
        if state.is_world_process_zero and nothing_to_train:
            print(f"nothing to train: resumed at step {state.global_step} of {state.max_steps}", flush=True)
        self.eval_seconds, self._eval = 0.0, None  # (its progress, start time) while evaluating
        # The first step compiles, allocates and warms caches: on a real model on CPU, minutes.
        self._first_step = contextlib.ExitStack()
        self._first_step.enter_context(
            phase(
                f"step {state.global_step + 1} (the first forward and backward)",
                enabled=state.is_world_process_zero and not nothing_to_train,
            )
        )

    def on_step_end(self, args, state, control, **kwargs):
        self._first_step.close()  # the first step ends the phase begun in on_train_begin

    def on_train_end(self, args, state, control, **kwargs):
        self._first_step.close()  # a run of no step (a resume at its end) has no first one

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self._eval is None:
            total = len(eval_dataloader) if hasattr(eval_dataloader, "__len__") else None
            self._eval = contextlib.ExitStack(), time.perf_counter()
            self._advance_eval = self._eval[0].enter_context(
                phase("eval", total, "batches", enabled=state.is_world_process_zero)
            )
        self._advance_eval()

    def on_evaluate(self, args, state, control, **kwargs):
        if self._eval is not None:
            bar, started = self._eval
            bar.close()
            seconds = time.perf_counter() - started
            self.eval_seconds += seconds
            self.last_time += seconds  # the next step's tokens/s x interval must not span the eval
            self._eval = None

    def _training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.eval_seconds

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            done = (state.global_step - self.first_step) / max(state.max_steps - self.first_step, 1)
            elapsed = self._training_seconds()
            eta = elapsed * (1 - done) / done if done else 0.0
            now = time.perf_counter()
            self.tokens += logs.get("tokens_per_second", 0) * (now - self.last_time)
            self.mfu_seconds += logs.get("mfu", 0) * (now - self.last_time)
            self.first_log, self.last_log, self.last_time = self.first_log or logs, logs, now
            mfu = f"  MFU {logs['mfu']:.1f}%" if "mfu" in logs else ""
            print(
                f"step {state.global_step:>{len(str(state.max_steps))}}/{state.max_steps}"
                f"  loss {logs['loss']:.4f}  {objective(logs)}  nll {logs.get('nll', NAN):.4f}"
                f"  margin {logs.get('rewards/margins', NAN):+.3f}  {quality(logs)}"
                f"  {logs.get('tokens_per_second', 0):,.0f} tok/s{mfu}  eta {clock(eta)}",
                flush=True,
            )
        elif "skipped" in logs:  # --skip-nonfinite: every step of this line was skipped
            print(
                f"step {state.global_step:>{len(str(state.max_steps))}}/{state.max_steps}  skipped"
                f" (a loss or gradient was not finite; {logs['nonfinite_skipped']} step(s) skipped so far)",
                flush=True,
            )
        elif "eval_loss" in logs:
            print(
                f"eval  loss {logs['eval_loss']:.4f}  margin {logs.get('eval_rewards/margins', NAN):+.3f}"
                f"  {quality(logs, 'eval_')}",
                flush=True,
            )
        elif "train_runtime" in logs and state.global_step > self.first_step:  # else: "nothing to train"
            print(  # this run's steps: a resumed run did not run the checkpoint's
                f"done: {state.global_step - self.first_step} steps in {clock(logs['train_runtime'])}, mean loss {logs['train_loss']:.4f}"
                + (f" ({logs['nonfinite_skipped']} skipped)" if logs.get("nonfinite_skipped") else "")
                + self._trend(),
                flush=True,
            )

    def _trend(self) -> str:
        """First → last logged margin and accuracy, and the mean training tokens/s of the run."""
        if self.last_log is None:
            return ""
        first, last = self.first_log, self.last_log
        seconds = self.last_time - self.started - self.eval_seconds
        trend = (
            f"kl {first['kl']:.3f} → {last['kl']:.3f}"
            if "kto_loss" in last
            else f"acc {accuracy(first)} → {accuracy(last)}"
        )
        return (
            f", margin {first.get('rewards/margins', NAN):+.3f} → {last.get('rewards/margins', NAN):+.3f}, {trend}"
            f", {self.tokens / seconds if seconds > 0 else 0:,.0f} tok/s"
            + (f", MFU {self.mfu_seconds / seconds:.1f}%" if "mfu" in last and seconds > 0 else "")
        )


def objective(logs: dict) -> str:
    """The preference term: dpo, or kto on a KTO cache."""
    if "kto_loss" in logs:
        return f"kto {logs['kto_loss']:.4f}"
    return f"dpo {logs.get('dpo_loss', NAN):.4f}"


def quality(logs: dict, prefix: str = "") -> str:
    """Reward accuracy for pairs; for KTO (no pairs to be right about) the reference point kl."""
    if f"{prefix}kto_loss" in logs:
        return f"kl {logs.get(f'{prefix}kl', NAN):.3f}"
    return f"acc {accuracy(logs, prefix)}"


def accuracy(logs: dict, prefix: str = "") -> str:
    """Reward accuracy, or "tie" when every margin was exactly 0 (the policy still equals its
    reference, at step 0 or in the first eval): 0.00 would read as "always wrong"."""
    if is_tie(logs, prefix):
        return "tie"
    return f"{logs.get(f'{prefix}rewards/accuracies', NAN):.2f}"
