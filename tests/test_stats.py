"""`mtdpo stats`: numbers read column-wise from the shards, checked against a plain Python
recount of every row; the table, --json, --plot and its missing-matplotlib error."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
from helpers import IGNORE, embedded_tokenizer, run_preprocess, sample_rows, trained_runs, write_jsonl
from typer.testing import CliRunner

from mtdpo.cli import app
from mtdpo.preprocess.records import MaskOptions
from mtdpo.stats import cache_stats, per_row, trained_run_starts, trained_tokens

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def messy_cache(tmp_path_factory) -> Path:
    """40 sample rows cut to 160 tokens (truncated and dropped rows), two bad JSON lines and an unknown role."""
    folder = tmp_path_factory.mktemp("stats")
    bad_role = {"chosen": [{"role": "robot", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}
    source = write_jsonl(folder / "rows.jsonl", [*sample_rows(40), "oops", bad_role, "also bad"])
    run_preprocess(source, folder / "cache", options=MaskOptions(max_length=160))
    return folder / "cache"


def summary(values, digits=0):
    """The same five numbers, computed with the statistics module."""
    exact = (lambda x: int(x)) if digits == 0 else (lambda x: round(x, digits))
    return {
        "min": exact(min(values)),
        "mean": round(statistics.fmean(values), max(digits, 2)),
        "median": round(statistics.median(values), max(digits, 1)),
        "p95": round(statistics.quantiles(values, n=20, method="inclusive")[18], max(digits, 1)),
        "max": exact(max(values)),
    }


def recount(cache: Path) -> dict:
    """Per-pair numbers from a Python loop over the rows (the code under test uses numpy on columns)."""
    tok = embedded_tokenizer()
    start = tok.convert_tokens_to_ids("<start_of_turn>")
    out = {}
    for r in datasets.load_from_disk(str(cache)):
        for side in ("chosen", "rejected"):
            ids, labels = r[f"{side}_input_ids"], r[f"{side}_labels"]
            trained = sum(label != IGNORE for label in labels)
            out.setdefault(f"{side}_len", []).append(len(ids))
            out.setdefault(f"{side}_trained", []).append(trained)
            out.setdefault(f"{side}_fraction", []).append(trained / len(ids))
            out.setdefault(f"{side}_turns", []).append(ids.count(start))
            out.setdefault(f"{side}_trained_turns", []).append(len(trained_runs(ids, labels)))
        out.setdefault("prompt_len", []).append(r["prompt_len"])
    return out


def test_numbers_match_a_row_by_row_recount(messy_cache):
    stats = cache_stats(messy_cache)
    rows = recount(messy_cache)
    assert stats["pairs"] == 39 and stats["template_family"] == "gemma" and stats["max_length"] == 160
    assert stats["counts"] == {"rows": 43, "kept": 39, "rejected": 3, "dropped": 1, "truncated": 29}
    for side in ("chosen", "rejected"):
        assert stats["lengths"][side] == summary(rows[f"{side}_len"])
        assert stats["turns"][side] == summary(rows[f"{side}_turns"])
        assert stats["trained_turns"][side] == summary(rows[f"{side}_trained_turns"])
        assert stats["trained_fraction_per_pair"][side] == summary(rows[f"{side}_fraction"], 3)
        assert stats["tokens"][side] == sum(rows[f"{side}_len"])
        assert stats["tokens"][f"{side}_trained"] == sum(rows[f"{side}_trained"])
        assert stats["trained_fraction"][side] == round(sum(rows[f"{side}_trained"]) / sum(rows[f"{side}_len"]), 4)
    assert stats["lengths"]["prompt"] == summary(rows["prompt_len"])
    assert stats["tokens"]["total"] == sum(rows["chosen_len"]) + sum(rows["rejected_len"])
    assert stats["tokens"]["prompt"] == sum(rows["prompt_len"])
    # and the totals agree with what preprocess counted while writing
    saved = json.loads((messy_cache / "stats.json").read_text())
    assert (stats["tokens"]["chosen"], stats["tokens"]["chosen_trained"]) == (
        saved["chosen_tokens"],
        saved["chosen_trained_tokens"],
    )
    assert stats["lengths"]["chosen"]["max"] == 160  # truncated rows are cut to --max-length


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_layout_tokens_are_what_each_collator_lays_out(messy_cache, batch_size):
    from mtdpo.cache import open_cache
    from mtdpo.train.data import forest_batch, shared
    from mtdpo.train.sampler import group_batches

    pairs = open_cache(messy_cache).pairs
    layouts = cache_stats(messy_cache, batch_size)["layout_tokens"]
    records = pairs.__getitems__(list(range(len(pairs))))
    assert layouts["alone"] == sum(len(r.chosen) + len(r.rejected) for r in records)
    assert layouts["prefix_sharing"] == sum(shared([r])["input_ids"].shape[1] for r in records)
    batches = group_batches(*pairs.prompts(), seed=42, batch_size=batch_size)
    assert layouts["prefix_forest"] == sum(forest_batch(pairs.__getitems__(b))["input_ids"].shape[1] for b in batches)
    assert layouts["prefix_forest"] <= layouts["prefix_sharing"] < layouts["alone"]


def test_reject_reasons_with_their_first_row(messy_cache):
    assert cache_stats(messy_cache)["reasons"] == [
        {"reason": "invalid JSON", "count": 2, "first_row": 40},
        {"reason": "chosen has no trained token left after truncation to --max-length 160", "count": 1, "first_row": 5},
        {
            "reason": "chosen[0] has unknown role 'robot' (known: system, user, assistant, tool, observation, ipython, function)",
            "count": 1,
            "first_row": 41,
        },
    ]


def test_reasons_from_rejects_jsonl_when_stats_json_is_missing(messy_cache, tmp_path):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(messy_cache, copy)
    (copy / "stats.json").unlink()
    stats = cache_stats(copy)
    assert stats["counts"] == {
        "rows": 43,
        "kept": 39,
        "rejected": 3,
        "dropped": 1,
        "truncated": 29,
    }  # from manifest.json
    assert [(r["reason"], r["count"], r["first_row"]) for r in stats["reasons"]] == [
        ("chosen has no trained token left after truncation to --max-length 160", 1, 5),
        ("invalid JSON: Expecting value at column 1", 2, 40),
        (
            "chosen[0] has unknown role 'robot' (known: system, user, assistant, tool, observation, ipython, function)",
            1,
            41,
        ),
    ]


def test_per_row_counts_on_sliced_chunks():
    """Column-wise counting honours chunk boundaries, slices and empty lists. A row's first label
    is never a trained token (nothing predicts it): the count the collator normalises the NLL by."""
    values = [[1, -100, 2, 3], [], [-100, -100], [4, -100, 5], [-100, 6]]
    whole = pa.array(values, type=pa.list_(pa.int32()))
    chunked = pa.chunked_array([whole.slice(0, 2), whole.slice(2, 3)])
    assert per_row(chunked, trained_tokens).tolist() == [2, 0, 0, 1, 1]
    assert per_row(chunked, trained_run_starts).tolist() == [2, 0, 0, 2, 1]
    sliced = pa.chunked_array([whole.slice(1, 4)])  # offsets that do not start at 0
    assert per_row(sliced, trained_tokens).tolist() == [0, 0, 1, 1]
    assert per_row(sliced, trained_run_starts).tolist() == [0, 0, 2, 1]
    assert per_row(pa.chunked_array([], type=whole.type), trained_tokens).tolist() == []


def test_table_in_the_terminal(messy_cache):
    result = invoke("stats", messy_cache)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"{messy_cache}: 39 pairs · template gemma · mask assistant · max length 160"
    stats = cache_stats(messy_cache)
    cells = {}
    for line in lines:
        parts = [p.strip() for p in line.replace("┃", "│").split("│")[1:-1]]
        if len(parts) >= 2:
            cells[parts[0]] = parts[1:]
    chosen = stats["lengths"]["chosen"]
    assert cells["chosen tokens"] == [
        f"{chosen['min']:,}",
        f"{chosen['mean']:,.1f}",
        f"{chosen['median']:,.1f}",
        f"{chosen['p95']:,.1f}",
        f"{chosen['max']:,}",
    ]
    assert cells["trained fraction (rejected)"][0] == f"{stats['trained_fraction_per_pair']['rejected']['min']:.3f}"
    assert cells["input rows"] == ["43"] and cells["kept pairs"] == ["39"]
    assert cells["rejected (unusable rows)"] == ["3"] and cells["dropped (nothing trained after truncation)"] == ["1"]
    assert cells["invalid JSON"] == ["2, first row 40"]
    assert cells["kept pairs cut to 160 tokens"] == ["29 (74.4%)"]
    tokens = stats["tokens"]
    assert cells["tokens chosen / rejected / total"] == [
        f"{tokens['chosen']:,} / {tokens['rejected']:,} / {tokens['total']:,}"
    ]


def test_json_is_the_same_numbers(messy_cache):
    result = invoke("stats", messy_cache, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(cache_stats(messy_cache)))


def test_unknown_template_family_has_no_turn_counts(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant\n{% endif %}"
    )
    run_preprocess(write_jsonl(tmp_path / "rows.jsonl", sample_rows(8)), tmp_path / "cache", chat_template=template)
    stats = cache_stats(tmp_path / "cache")
    assert stats["template_family"] is None and stats["turns"] is None
    assert stats["trained_turns"]["chosen"] == summary(recount(tmp_path / "cache")["chosen_trained_turns"])
    out = invoke("stats", tmp_path / "cache").stdout
    assert (
        "template unknown" in out.splitlines()[0]
        and "│ turns (chosen)" not in out
        and "│ trained turns (chosen)" in out
    )


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_plot_writes_a_png(messy_cache, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "stats.png"
    result = invoke("stats", messy_cache, "--plot", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"wrote {out}"
    assert png_size(out) == (1600, 450)


def test_plot_without_matplotlib_says_how_to_get_it(messy_cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    result = invoke("stats", messy_cache, "--plot", tmp_path / "stats.png")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == "error: plotting needs matplotlib: pip install 'mtdpo[plot]'\n"
    assert not (tmp_path / "stats.png").exists()


def test_stats_of_a_non_cache(tmp_path):
    result = invoke("stats", tmp_path)
    assert result.exit_code == 2
    assert (
        result.stderr == f"error: {tmp_path} is not an mtdpo cache (no manifest.json); run `mtdpo preprocess` first\n"
    )


def test_numpy_views_do_not_copy_the_shards(messy_cache):
    """The lists are read through Arrow's buffers: the values array of a column is a view."""
    ds = datasets.load_from_disk(str(messy_cache))
    chunk = ds.data.column("chosen_labels").chunks[0]
    values = chunk.values.to_numpy()
    assert not values.flags.owndata and values.dtype == np.int32


def test_a_kto_cache_is_described_by_label(tmp_path):
    """Each number of the desirable and the undesirable rows, recounted row by row."""
    from trainkit import make_kto_cache

    from mtdpo.cache import open_cache

    cache = make_kto_cache(tmp_path, n=5)
    stats = cache_stats(cache)
    opened = open_cache(cache)
    records = [opened.record(i) for i in range(len(opened))]
    assert stats["kind"] == "kto" and stats["rows"] == 10 and "pairs" not in stats
    assert stats["counts"] | {} == {
        "rows": 10,
        "kept": 10,
        "rejected": 0,
        "dropped": 0,
        "truncated": 0,
        "desirable": 5,
        "undesirable": 5,
    }
    for group, label in (("desirable", True), ("undesirable", False)):
        mine = [r for r in records if r.desirable is label]
        assert stats["tokens"][group] == sum(len(r.sequence) for r in mine)
        assert stats["tokens"][f"{group}_trained"] == sum(r.sequence.trained_tokens for r in mine)
        assert stats["lengths"][group]["max"] == max(len(r.sequence) for r in mine)
        runs = [len(trained_runs(r.sequence.input_ids, r.sequence.labels)) for r in mine]
        assert stats["trained_turns"][group]["max"] == max(runs) and stats["trained_turns"][group]["min"] == min(runs)
    assert stats["tokens"]["prompt"] == sum(r.prompt_len for r in records)
    result = invoke("stats", cache)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"{cache}: 10 KTO rows · template gemma · mask assistant · max length 2048"
    assert "trained fraction (undesirable)" in result.stdout and "desirable / undesirable rows" in result.stdout
    assert json.loads(invoke("stats", cache, "--json").stdout)["trained_fraction_per_row"]["desirable"]["max"] <= 1


@pytest.mark.parametrize("batch_size", [1, 4])
def test_kto_layout_tokens_are_what_the_kto_collator_lays_out(tmp_path, batch_size):
    """A KTO cache's rows alone and as forests of rows grouped by prompt (rows 2k and 2k + 1
    share one: kto_rows), each what KtoCollator's policy sub-batch holds."""
    from trainkit import make_kto_cache

    from mtdpo.cache import open_cache
    from mtdpo.train.kto_data import KtoCollator
    from mtdpo.train.sampler import group_batches

    cache = make_kto_cache(tmp_path, n=5)
    opened = open_cache(cache)
    layouts = cache_stats(cache, batch_size)["layout_tokens"]
    assert layouts["alone"] == sum(len(opened.record(i).sequence) for i in range(len(opened)))
    forest = KtoCollator(0, prefix_forest=True)
    laid_out = sum(
        forest([(opened.record(i), None) for i in b])["policy"]["input_ids"].shape[1]
        for b in group_batches(*opened.prompts(), seed=42, batch_size=batch_size)
    )
    assert layouts["prefix_forest"] == laid_out
    assert (layouts["prefix_forest"] < layouts["alone"]) is (batch_size > 1)  # a prompt once per problem
    assert "prefix forest, batch 4" in invoke("stats", cache, "--batch-size", "4").stdout
