"""Session fixtures: expensive objects the tests share, built once (helpers: helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import invoke, run_preprocess

from mtdpo.assets import SAMPLE_DATA


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    """The embedded sample preprocessed with the defaults, shared read-only by tests."""
    out = tmp_path_factory.mktemp("sample") / "cache"
    run_preprocess(SAMPLE_DATA, out)
    return out


@pytest.fixture(scope="session")
def cli_cache(tmp_path_factory) -> Path:
    """The bundled sample preprocessed through the command line, with its summary table checked."""
    out = tmp_path_factory.mktemp("cli") / "demo"
    result = invoke("preprocess", SAMPLE_DATA, "--out", out)
    assert result.exit_code == 0, result.output
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.stdout.splitlines() if "│" in line]
    summary = dict(cells)
    assert (summary["rows"], summary["kept"], summary["rejected"], summary["truncated"]) == ("240", "240", "0", "0")
    return out
