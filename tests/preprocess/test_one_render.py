"""One render per side (preprocess/skeleton.py) gives exactly what the prefix renders give.

A row's spans come from its conversation shape, rendered once with placeholder contents,
only when the row's real render equals that skeleton filled with its contents byte for byte;
any other row takes the prefix renders. Either way the outcome must be the same: the same
record, or the same reason for rejecting the row.
"""

from __future__ import annotations

import pytest
from helpers import (
    FAMILIES,
    RowEncoder,
    family_tokenizer,
    for_family,
    math_agent_pairs,
    msg,
    run_preprocess,
    sample_rows,
)

from mtdpo.assets import SAMPLE_DATA
from mtdpo.preprocess import records
from mtdpo.preprocess.records import MaskOptions
from mtdpo.preprocess.rows import RowError


def awkward_rows() -> list[dict]:
    """Contents a template may treat differently from a placeholder."""
    q = msg("user", "What is 2 + 2?")
    answers = [
        "  padded with spaces  ",  # trimming templates
        "\nleading newline",
        "ends with a newline\n",
        "<think>a thought</think>The answer is 4.",  # templates that move or drop think blocks
        "holds \ue0000\ue001, a placeholder's own text",
        "",  # an empty assistant message: rejected, with the same reason
        "   ",
        "two\n\nparagraphs",
    ]
    rows = [{"chosen": [q, msg("assistant", a)], "rejected": [q, msg("assistant", "It is 5.")]} for a in answers]
    rows.append(
        {
            "chosen": [q, msg("assistant", "4"), msg("user", "Sure?"), msg("assistant", "Yes, 4.")],
            "rejected": [q, msg("assistant", "4"), msg("user", "Sure?"), msg("assistant", "No, 5.")],
        }
    )
    rows.append(
        {
            "chosen": [msg("system", "Be brief."), q, msg("assistant", "4")],
            "rejected": [msg("system", "Be brief."), q, msg("assistant", "5")],
        }
    )
    return rows


class NoSkeletons:
    """A SkeletonCache that never has a skeleton: every row takes the prefix renders."""

    def __init__(self, chat):
        self.skeletons = {}

    def spans(self, *args):
        return None


def outcome(tok, row: dict, one_render: bool, used: list):
    encoder = RowEncoder(tok, MaskOptions(), one_render=one_render)
    try:
        result = encoder(row)
    except RowError as err:
        result = f"RowError: {err}"
    skeletons = encoder.builder.skeletons.skeletons if one_render else {}
    used.append(any(s is not None for s in skeletons.values()))
    return result


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_render_equals_the_prefix_renders_on_every_family(family):
    tok = family_tokenizer(family)
    rows = [for_family(r, family) for r in [*sample_rows(40), *math_agent_pairs().values(), *awkward_rows()]]
    used = []
    for n, row in enumerate(rows):
        slow = outcome(tok, row, False, [])
        fast = outcome(tok, row, True, used)
        assert fast == slow, (family, n)
    if family in ("gemma", "llama3", "qwen2", "mistral", "phi3", "gemma3"):
        assert sum(used) >= len(rows) // 2, (family, sum(used))  # the fast path did serve rows


def test_one_render_writes_byte_identical_shards(tmp_path, monkeypatch):
    run_preprocess(SAMPLE_DATA, tmp_path / "fast")
    monkeypatch.setattr(records, "SkeletonCache", NoSkeletons)
    run_preprocess(SAMPLE_DATA, tmp_path / "slow")
    for name in ("data-00000-of-00001.arrow", "rejects.jsonl", "checksums.json"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name


def test_a_row_that_differs_from_its_skeleton_takes_the_prefix_renders(monkeypatch):
    """A trimming template renders "  x  " as "x": the filled skeleton differs, so no fast path."""
    tok = family_tokenizer("gemma3")
    encoder = RowEncoder(tok, MaskOptions())
    calls = []
    original = records.generation_turns
    monkeypatch.setattr(records, "generation_turns", lambda *a, **k: calls.append(1) or original(*a, **k))
    q = msg("user", "Hi")
    encoder({"chosen": [q, msg("assistant", "Hello.")], "rejected": [q, msg("assistant", "Go away.")]})
    assert calls == []
    encoder({"chosen": [q, msg("assistant", "  Hello.  ")], "rejected": [q, msg("assistant", "Go away.")]})
    assert calls == [1]
