"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input path, bad option, existing output …: no traceback, just the reason."""


class NonFiniteLoss(UsageError):
    """A NaN or infinite loss: the message names the step and the batch's source rows."""


class NonFiniteWeights(UsageError):
    """Weights that are NaN or infinite after a step: the run stops before saving them."""


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint; the CLI exits with 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
