"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input path, bad option, existing output …: no traceback, just the reason."""
