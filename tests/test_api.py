"""The Python API (mtdpo/api.py): `from mtdpo import preprocess, train, open_cache`, with the CLI's
arguments and messages, and `import mtdpo` as cheap as before. (The README's example runs in
tests/test_docs.py.)"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from helpers import REPO, sample_rows, write_jsonl
from typer.main import get_command

from mtdpo.api import train_arguments
from mtdpo.cli import app
from mtdpo.errors import UsageError


def test_the_functions_take_the_commands_options():
    from mtdpo import preprocess

    command = get_command(app).commands["preprocess"]
    assert list(inspect.signature(preprocess).parameters) == [param.name for param in command.params]


def test_preprocess_and_open_cache(tmp_path):
    from mtdpo import open_cache, preprocess

    data = write_jsonl(tmp_path / "pairs.jsonl", sample_rows(6))
    stats = preprocess(data, tmp_path / "cache", max_length=512, quiet=True)
    cache = open_cache(tmp_path / "cache")
    assert stats["kept"] == len(cache) == 6 and cache.manifest.max_length == 512
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        preprocess(data, tmp_path / "cache", quiet=True)


def test_train_options_are_parsed_as_the_command_line_parses_them(sample_cache):
    from mtdpo import train

    arguments = train_arguments(["a", "b"], None, {"bf16": False, "max_steps": 2, "ref_model": None, "x": {"k": 1}})
    assert arguments == ["--data", "a", "b", "--bf16", "false", "--max_steps", "2", "--x", '{"k": 1}']
    with pytest.raises(UsageError, match=r"^unknown option: --bta \(did you mean --beta\?\)$"):
        train(sample_cache, bta=0.2)


def test_import_mtdpo_loads_nothing_heavy():
    """The CLI starts without torch; the API names load on first use."""
    code = (
        "import sys, mtdpo, mtdpo.cli; from mtdpo import preprocess, open_cache; "
        "print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)), callable(preprocess))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout == "[] True\n", proc.stderr
