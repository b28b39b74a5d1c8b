"""Training that survives a preemption and does not train on a non-finite loss.

StopOnSignal: the SIGTERM of a scheduler (preemption, `scancel`, `kill`) lets the current
optimizer step finish, saves a checkpoint and stops; `--resume-from-checkpoint auto` goes on
from it with the same losses. The handler only sets a flag: the work happens between steps, on
every rank at the same step, even when only some ranks were signalled. Further SIGTERMs are
ignored (a scheduler and torchrun may both send one to each rank): SIGINT (Ctrl-C) and SIGKILL
still stop at once, without a checkpoint.

NonFiniteGuard: a NaN or infinite loss stops training with the step and the batch's source
rows named (they are the cache's `row` column: line numbers of the input), before any weight
is touched. With --skip-nonfinite the batch gives a zero gradient instead and is counted.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from mtdpo.errors import NonFiniteLoss

logger = logging.getLogger("mtdpo")


class StopOnSignal(TrainerCallback):
    """Register it with the Trainer and run `trainer.train()` inside `with stop.installed():`."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: int | None = None  # the signal this rank got, once one came
        self.stop_signal: int | None = None  # the one all ranks stopped for (maybe another rank's)
        self.stopped_at: int | None = None  # the step whose checkpoint was saved
        self._previous: dict[int, object] = {}

    @contextmanager
    def installed(self):
        """The handlers, for the length of the block (restored even when training raises)."""
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        try:
            yield self
        finally:
            self._restore()

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            logger.warning("got %s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        signum = _max_over_ranks(self.received or 0, args.device)
        if signum and self.stopped_at is None:
            control.should_save = True
            control.should_training_stop = True
            self.stop_signal, self.stopped_at = signum, state.global_step

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class NonFiniteGuard:
    def __init__(self, skip: bool):
        self.skip = skip
        self.skipped = 0  # batches skipped so far (logged as nonfinite_skipped)

    def finite(self, loss: torch.Tensor, rows: torch.Tensor | None, step: int, accelerator) -> bool:
        """True if the loss is finite on every rank; else raise NonFiniteLoss, or (skip) count it."""
        here = not bool(torch.isfinite(loss.detach()).all())
        # Every rank must take the same way out, or the others would wait for it forever.
        if not bool(accelerator.gather(torch.tensor([int(here)], device=loss.device)).any()):
            return True
        value = f"{loss.item():g}" if here else "not finite"
        source = (
            f"source rows {', '.join(map(str, rows.tolist()))}"
            if here and rows is not None
            else "a batch on another rank"
        )
        if not self.skip:
            raise NonFiniteLoss(
                f"the loss is {value} at step {step} ({source}); check those rows or lower the learning rate, "
                "or pass --skip-nonfinite to skip such batches"
            )
        self.skipped += 1
        logger.warning(
            "step %d: skipped a batch whose loss is %s (%s); %d skipped so far", step, value, source, self.skipped
        )
        return False


def zero_gradient(model, loss: torch.Tensor) -> torch.Tensor:
    """A loss with the batch's value (Trainer's logging leaves non-finite values out of the
    logged mean) and a zero gradient for every weight, so the batch moves nothing. Every rank
    still runs backward, as DDP needs."""
    zero = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
    return zero + loss.detach()


def _max_over_ranks(value: int, device) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())
