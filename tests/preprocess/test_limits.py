"""What one row may cost (mtdpo/preprocess/limits.py, issue 29): a row far beyond --max-length is
rejected before it is rendered, saying what to pass to keep it; a chat template that loops costs
at most --render-timeout per row, and a template that never finishes stops the run."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
from helpers import msg, run_preprocess, sample_rows, write_jsonl

from mtdpo.errors import UsageError
from mtdpo.preprocess import pipeline
from mtdpo.preprocess.limits import RenderTimeout, default_max_chars, time_limit
from mtdpo.preprocess.records import MaskOptions, RecordBuilder

EMBEDDED_TEMPLATE = (Path(pipeline.__file__).parents[1] / "assets" / "tokenizer" / "chat_template.jinja").read_text()
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def rejects(cache: Path) -> dict[int, str]:
    import json

    return {r["row"]: r["reason"] for r in map(json.loads, (cache / "rejects.jsonl").read_text().splitlines())}


@pytest.fixture
def rendered_rows(monkeypatch) -> list[int]:
    """Row numbers that reached the record builder (rendering, masking)."""
    seen, build = [], RecordBuilder.__call__

    def counting(self, n, row):
        seen.append(n)
        return build(self, n, row)

    monkeypatch.setattr(RecordBuilder, "__call__", counting)
    return seen


# ── characters ────────────────────────────────────────────────────────────────


def long_row(characters: int) -> dict:
    row = sample_rows(1)[0]
    row["chosen"][-1] = msg("assistant", "7 " * (characters // 2))
    return row


def test_a_row_far_beyond_max_length_is_rejected_before_it_is_rendered(tmp_path, rendered_rows):
    """Before, one 18.6 MB row took 85 s and 5.7 GB before being cut to 2,048 tokens. By default a
    row may hold 64 characters per token of --max-length, and never fewer than 1,000,000."""
    assert (default_max_chars(2048), default_max_chars(20_000)) == (1_000_000, 1_280_000)
    source = write_jsonl(tmp_path / "rows.jsonl", [*sample_rows(2), long_row(1_100_000), *sample_rows(2)])
    stats = run_preprocess(source, tmp_path / "cache")
    assert (stats["kept"], stats["rejected"], stats["reasons"]) == (4, 1, {"row too long": 1})
    reason = rejects(tmp_path / "cache")[2]
    found = re.fullmatch(
        r"row too long: ([\d,]+) characters, more than --max-chars 1,000,000; pass --max-chars (\d+) or more to keep it",
        reason,
    )
    assert found and int(found[1].replace(",", "")) == int(found[2]) and 1_100_000 < int(found[2]) < 1_110_000, reason
    assert 2 not in rendered_rows and sorted(rendered_rows) == [0, 1, 3, 4]


def test_the_reason_says_what_keeps_the_row(tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", [*sample_rows(2), long_row(6_000)])
    run_preprocess(source, tmp_path / "small", max_chars=5_000)
    needed = re.search(r"pass --max-chars (\d+)", rejects(tmp_path / "small")[2])[1]
    stats = run_preprocess(source, tmp_path / "kept", max_chars=int(needed))
    assert (stats["kept"], stats["rejected"]) == (3, 0)
    stats = run_preprocess(source, tmp_path / "short", max_chars=int(needed) - 1)
    assert (stats["kept"], stats["rejected"]) == (2, 1)


def test_max_chars_must_be_positive(tmp_path):
    with pytest.raises(UsageError, match="^--max-chars must be at least 1$"):
        run_preprocess(write_jsonl(tmp_path / "rows.jsonl", sample_rows(1)), tmp_path / "cache", max_chars=0)


# ── time ──────────────────────────────────────────────────────────────────────


def template_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "template.jinja"
    path.write_text(text)
    return path


def test_a_row_the_template_never_finishes_is_rejected_and_the_others_kept(tmp_path):
    """The template loops on one row's content only: that row costs --render-timeout, not forever."""
    looping = template_file(
        tmp_path,
        "{% for m in messages %}{% if 'LOOP' in m['content'] %}" + LOOP + "{% endif %}{% endfor %}" + EMBEDDED_TEMPLATE,
    )
    rows = sample_rows(4)
    rows[2]["chosen"][-1] = msg("assistant", "LOOP")
    started = time.monotonic()
    stats = run_preprocess(
        write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "cache", chat_template=looping, render_timeout=0.5
    )
    assert time.monotonic() - started < 60
    assert (stats["kept"], stats["rejected"]) == (3, 1)
    assert rejects(tmp_path / "cache") == {2: "chat template render took more than 0.5 s (--render-timeout)"}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_template_that_never_finishes_stops_the_run(tmp_path, monkeypatch, rendered_rows, num_proc):
    """Every real row loops (the one-turn probe does not): the run stops after the first rows, in one line."""
    looping = template_file(tmp_path, "{% if messages|length > 2 %}" + LOOP + "{% endif %}" + EMBEDDED_TEMPLATE)
    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 16)
    with pytest.raises(UsageError) as err:
        run_preprocess(
            write_jsonl(tmp_path / "rows.jsonl", sample_rows(64)),
            tmp_path / "cache",
            chat_template=looping,
            render_timeout=0.3,
            num_proc=num_proc,
        )
    assert str(err.value) == (
        "the chat template never finishes rendering: the first 3 rows each took more than 0.3 s (--render-timeout); "
        "no cache written"
    )
    if num_proc == 1:
        assert rendered_rows == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "template.jinja"]


def test_a_template_that_never_renders_a_turn_stops_before_any_row(tmp_path, rendered_rows):
    looping = template_file(tmp_path, LOOP + EMBEDDED_TEMPLATE)
    with pytest.raises(UsageError) as err:
        run_preprocess(
            write_jsonl(tmp_path / "rows.jsonl", sample_rows(3)),
            tmp_path / "cache",
            chat_template=looping,
            render_timeout=0.3,
        )
    assert str(err.value) == (
        f"the chat template of {looping} never finishes rendering: a one-turn conversation took more than 0.3 s "
        "(--render-timeout)"
    )
    assert rendered_rows == []


def test_the_time_limit_leaves_the_alarm_as_it_found_it():
    before = signal.getsignal(signal.SIGALRM)
    with time_limit(5):
        pass
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with pytest.raises(RenderTimeout, match=r"^chat template render took more than 0.1 s \(--render-timeout\)$"):
        with time_limit(0.1):
            while True:
                pass
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    signal.setitimer(signal.ITIMER_REAL, 100)  # someone else's timer (pytest-timeout's, say) runs on
    try:
        with time_limit(5):
            pass
        assert 99 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_mask_options_keep_the_seed_markers_and_the_limits(tmp_path):
    """Seed mode rebuilds its options with the resolved markers: the limits must survive that."""
    source = write_jsonl(tmp_path / "rows.jsonl", [*sample_rows(2), long_row(6_000)])
    stats = run_preprocess(source, tmp_path / "cache", options=MaskOptions("seed"), max_chars=5_000)
    assert (stats["kept"], stats["reasons"]) == (2, {"row too long": 1})
