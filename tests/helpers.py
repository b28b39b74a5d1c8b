"""Helpers the CLI tests share: run a command in-process, check a one-line user error."""

from __future__ import annotations

from typer.testing import CliRunner

from mtdpo.cli import app

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def assert_user_error(result, message: str) -> None:
    """Exit code 2, one line on stderr naming the problem, nothing on stdout, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {message}"
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
