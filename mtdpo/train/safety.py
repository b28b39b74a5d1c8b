"""Training that survives a preemption and does not train on a non-finite loss.

StopOnSignal: the SIGTERM of a scheduler (preemption, `scancel`, `kill`) lets the current
optimizer step finish, saves a checkpoint and stops; `--resume-from-checkpoint auto` goes on
from it with the same losses. The handler only sets a flag: the work happens between steps, on
every rank at the same step, even when only some ranks were signalled. Further SIGTERMs are
ignored (a scheduler and torchrun may both send one to each rank): SIGINT (Ctrl-C) and SIGKILL
still stop at once, without a checkpoint.

NonFiniteGuard: a NaN or infinite loss, or a gradient that is not finite (an overflow: the
loss can be finite while its gradient is not), stops training with the step and the batch's
source rows named (they are the cache's `row` column: line numbers of the input), before any
weight is touched. With --skip-nonfinite the whole optimizer step is skipped instead: every
gradient is set to None, which torch's optimizers take as "leave this weight alone" (no update,
no weight decay, no Adam moment or step count moves); the step is logged as skipped, not as a
loss. Whatever the option, the weights are checked after every step and at the end: weights that
are not finite (under DeepSpeed, whose own optimizer step cannot be skipped) stop the run before
anything is saved.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from mtdpo.errors import NonFiniteLoss, NonFiniteWeights

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


class NonFiniteGuard(TrainerCallback):
    """The trainer calls `finite` on each training batch's loss and `add_loss` with what its
    training_step returns; as a callback it decides each optimizer step and checks the weights."""

    def __init__(self, skip: bool, trainer):
        self.skip, self.trainer = skip, trainer
        self.skipped = 0  # optimizer steps skipped so far (logged as nonfinite_skipped)
        self.kept_since_log = self.skipped_since_log = 0
        self._new_step()

    def _new_step(self) -> None:
        self.bad_batch, self.step_loss, self.rows = False, 0.0, []

    def finite(self, loss: torch.Tensor, rows: torch.Tensor | None, step: int, accelerator) -> bool:
        """True if the loss is finite on every rank; else raise NonFiniteLoss, or (skip) note it."""
        if rows is not None:
            self.rows += rows.tolist()
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
        self.bad_batch = True
        logger.warning("step %d: skipped: the loss of a batch is %s (%s)", step, value, source)
        return False

    def add_loss(self, loss: torch.Tensor) -> None:
        """What training_step returned (and Trainer adds to its logged loss) for a batch of this step."""
        self.step_loss = self.step_loss + loss.detach()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        bad_gradient = not all_finite(gradients, args.device)
        if not (self.bad_batch or bad_gradient):
            self.kept_since_log += 1
            self._new_step()
            return
        source = f"source rows {', '.join(map(str, self.rows))} on this rank" if self.rows else "its batches"
        if not self.bad_batch:
            if not self.skip:
                raise NonFiniteLoss(
                    f"the gradient is not finite at step {step} ({source}), though the loss is: lower the learning "
                    "rate, or pass --skip-nonfinite to skip such steps"
                )
            logger.warning("step %d: skipped: the gradient is not finite (%s)", step, source)
        optimizer.zero_grad(set_to_none=True)  # the optimizer leaves weights without a gradient alone
        self.trainer.forget_loss(self.step_loss)
        self.skipped += 1
        self.skipped_since_log += 1
        self._new_step()

    def interval(self) -> tuple[int, int]:
        """(kept, skipped) optimizer steps since the last call: the steps a logged line covers."""
        counts = self.kept_since_log, self.skipped_since_log
        self.kept_since_log = self.skipped_since_log = 0
        return counts

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.check_weights(model, args.device, f"after step {state.global_step}", trainable_only=True)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.check_weights(model, args.device, "at the end of training", trainable_only=False)

    @staticmethod
    def check_weights(model, device, when: str, trainable_only: bool) -> None:
        """Stop before a checkpoint or the model is saved if a weight is NaN or infinite."""
        weights = [p for p in model.parameters() if p.requires_grad or not trainable_only]
        if not all_finite([getattr(p, "ds_tensor", p) for p in weights], device):  # ZeRO-3: this rank's partition
            bad = [n for n, p in model.named_parameters() if p.numel() and not all_finite([p], device, gather=False)]
            raise NonFiniteWeights(
                f"the weights are not finite {when} ({', '.join(bad[:3]) or 'on another rank'}"
                f"{', …' if len(bad) > 3 else ''}): stopped before saving them; lower the learning rate"
            )


def all_finite(tensors: list[torch.Tensor], device, gather: bool = True) -> bool:
    """Whether no floating tensor holds a NaN or an infinity, on any rank (one reduction: the
    largest magnitude of each tensor, which is NaN or inf when one of its values is)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP: this rank's shard
    peaks = [torch.linalg.vector_norm(t.detach(), float("inf")) for t in local if t.numel() and t.is_floating_point()]
    bad = bool(peaks) and not bool(torch.isfinite(torch.stack([p.float().to(peaks[0].device) for p in peaks])).all())
    return not (_max_over_ranks(int(bad), device) if gather else bad)


def zero_gradient(model) -> torch.Tensor:
    """A loss of value 0 (with finite weights) and a zero gradient for every weight, for a batch
    whose step will be skipped: it adds nothing to the logged loss. Every rank still runs
    backward, as DDP needs."""
    return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)


def _max_over_ranks(value: int, device) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())
