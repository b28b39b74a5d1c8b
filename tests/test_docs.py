"""The README and docs/ are true: their quoted outputs are what the code prints today, their
generated tables are current, and every picture is produced by a listed command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from typer.testing import CliRunner

from mtdpo.cli import app

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
runner = CliRunner()


def script(name: str):
    """A scripts/*.py file as a module (in-process: the libraries are already imported)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_blocks(markdown: str) -> list[str]:
    """Bodies of fenced blocks (``` or ````, the longer fence for text that holds ```)."""
    return [m.group(2) for m in re.finditer(r"^(`{3,})[^\n]*\n(.*?)^\1$", markdown, flags=re.S | re.M)]


def quoted_output(command: str) -> str:
    """What the README shows after `$ command`, up to the end of its block or the next `$ `."""
    block = next(b for b in code_blocks(README) if f"$ {command}\n" in b)
    return block.split(f"$ {command}\n", 1)[1].split("\n$ ", 1)[0]


def test_setup_commands_come_first():
    first = code_blocks(README)[0]
    assert [line.split()[:2] for line in first.splitlines()] == [["make", "demo"], ["make", "test"]]


def test_readme_stats_table_is_what_stats_prints(sample_cache):
    """`sample_cache` is the bundled sample preprocessed with the defaults, as `make demo` does."""
    result = runner.invoke(app, ["stats", str(sample_cache)])
    assert result.exit_code == 0, result.output
    shown = quoted_output("mtdpo stats data_cache/demo --plot docs/images/stats.png").splitlines()
    printed = result.stdout.splitlines()
    assert shown[0] == printed[0].replace(str(sample_cache), "data_cache/demo")
    assert shown[1:-1] == printed[1:]  # the last quoted line is "wrote docs/images/stats.png"
    assert shown[-1] == "wrote docs/images/stats.png"


def test_readme_show_sample_text_is_what_show_sample_prints(sample_cache):
    result = runner.invoke(app, ["show-sample", str(sample_cache), "--index", "0", "--side", "chosen"])
    assert result.exit_code == 0, result.output
    # the block drops the output's last, empty line
    assert quoted_output("mtdpo show-sample data_cache/demo --index 0 --side chosen | cat") + "\n" == result.stdout


def test_every_readme_picture_is_committed_and_made_by_the_assets_script():
    script = (REPO / "scripts" / "make_readme_assets.sh").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert sorted(pictures) == [
        "docs/images/show-sample.png",
        "docs/images/stats.png",
        "docs/images/training-curves.png",
    ]
    for picture in pictures:
        assert (REPO / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
        assert picture in script, picture
        # and the README names the command beside it
        assert re.search(rf"\$ (mtdpo|scripts/)\S* .*{re.escape(picture)}", README), picture


def test_config_doc_tables_are_generated_from_the_code():
    doc = (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert script("make_config_doc").generated() in doc, (
        "docs/CONFIG.md is stale: run .venv/bin/python scripts/make_config_doc.py --write"
    )
    for option in ("--nll-coef", "--beta", "--max-length", "--mask-mode", "--search", "--html", "--plot"):
        assert f"`{option}`" in doc


def test_masking_doc_quotes_the_current_masks():
    examples = script("masking_examples")
    doc = (REPO / "docs" / "MASKING.md").read_text(encoding="utf-8")
    for family in examples.FAMILIES:
        assert f"### {family}\n\n````\n{examples.example(family)}\n````\n" in doc, family


def test_masking_doc_quotes_the_context_examples():
    examples = script("masking_examples")
    doc = (REPO / "docs" / "MASKING.md").read_text(encoding="utf-8")
    for family in examples.CONTEXT_FAMILIES:
        assert f"#### {family}\n\n````\n{examples.context_example(family)}\n````\n" in doc, family


def test_docs_name_only_tests_that_exist():
    """Every `test_…` a document cites is a test in tests/."""
    source = "".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").rglob("test_*.py"))
    defined = set(re.findall(r"^def (test_\w+)", source, flags=re.M))
    for doc in ("MASKING.md", "CONFIG.md", "FAQ.md"):
        cited = set(
            re.findall(r"`(?:tests/[\w/]+\.py::)?(test_\w+)`", (REPO / "docs" / doc).read_text(encoding="utf-8"))
        )
        assert cited <= defined, (doc, cited - defined)


def test_readme_layout_names_every_folder_and_doc():
    import subprocess

    layout = README.split("## Layout", 1)[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    folders = {path.split("/")[0] for path in tracked if "/" in path}
    for folder in folders:
        assert f"\n{folder}/" in layout, folder
    for doc in (REPO / "docs").glob("*.md"):
        assert doc.name in layout, doc.name


def test_docs_cited_in_the_code_exist():
    """Every doc a comment cites (docs/FAQ.md, or DESIGN.md for docs/DESIGN.md) is a file of this repository."""
    for path in [*REPO.glob("mtdpo/**/*.py"), *REPO.glob("tests/**/*.py")]:
        for name in re.findall(r"\b((?:docs/)?[A-Z]+\.md)\b", path.read_text(encoding="utf-8")):
            target = REPO / name if name.startswith("docs/") else REPO / "docs" / name
            assert target.is_file() or (REPO / name).is_file(), f"{path.relative_to(REPO)} cites {name}"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python example, run as written from a fresh clone's root (its inputs linked in)."""
    block = next(b for b in code_blocks(README) if b.startswith("from mtdpo import preprocess, train, open_cache"))
    assert len([line for line in block.splitlines() if line.strip()]) == 5
    (tmp_path / "mtdpo").symlink_to(REPO / "mtdpo")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    kept, pairs, loss = capsys.readouterr().out.splitlines()[-1].split()
    assert (kept, pairs) == ("240", "240") and float(loss) > 0
    assert (tmp_path / "runs" / "api" / "model.safetensors").is_file()
