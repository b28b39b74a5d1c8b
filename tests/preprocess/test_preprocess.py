"""Stage one end to end (mtdpo.preprocess.pipeline.preprocess): counts, stats and manifest,
the schema-1 shards, truncation and drops, rejects, --strict, num_proc and atomic writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from helpers import (
    IGNORE,
    RowEncoder,
    embedded_tokenizer,
    hidden_leftovers,
    msg,
    run_preprocess,
    sample_rows,
    write_jsonl,
)

from mtdpo import __version__
from mtdpo.assets import EMBEDDED_TOKENIZER, SAMPLE_DATA
from mtdpo.errors import UsageError
from mtdpo.fingerprint import sha256_file, sha256_text, tokenizer_fingerprint, vocabulary_hash, vocabulary_hash_dir
from mtdpo.preprocess import pipeline
from mtdpo.preprocess.records import MaskOptions
from mtdpo.preprocess.tokenizer import load_tokenizer
from mtdpo.synthetic import make_pairs

LIST_INT32 = pa.list_(pa.int32())
SCHEMA_1 = {  # docs/DESIGN.md, "The cache contract"
    "chosen_input_ids": LIST_INT32,
    "chosen_labels": LIST_INT32,
    "rejected_input_ids": LIST_INT32,
    "rejected_labels": LIST_INT32,
    "prompt_len": pa.int32(),
    "chosen_len": pa.int32(),
    "rejected_len": pa.int32(),
    "row": pa.int64(),
    "problem": pa.int64(),  # optional to readers: caches written before it open without it
}
SIDES = ("chosen", "rejected")
COUNTS = ("rows", "kept", "rejected", "dropped", "truncated")
TOKEN_TOTALS = ("chosen_tokens", "rejected_tokens", "chosen_trained_tokens", "rejected_trained_tokens")


def load(cache: Path) -> datasets.Dataset:
    return datasets.load_from_disk(str(cache))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_rejects(cache: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(cache) / "rejects.jsonl").read_text().splitlines()]


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def n_trained(labels: list[int]) -> int:
    return sum(label != IGNORE for label in labels)


def arrow_table(cache: Path) -> pa.Table:
    """The data-*.arrow shards themselves (Arrow IPC streams), without datasets in between."""
    tables = []
    for shard in sorted(Path(cache).glob("data-*.arrow")):
        with pa.memory_map(str(shard)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


# ── the sample, default options ───────────────────────────────────────────────


def test_sample_counts_and_stats(sample_cache):
    stats = read_json(sample_cache / "stats.json")
    assert {k: stats[k] for k in COUNTS} == {"rows": 240, "kept": 240, "rejected": 0, "dropped": 0, "truncated": 0}
    assert stats["reasons"] == {}
    assert read_rejects(sample_cache) == []
    assert stats["seconds"] > 0 and stats["rows_per_second"] == pytest.approx(240 / stats["seconds"], rel=0.01)
    # Token totals are the sums over the shards (and pinned: the sample and tokenizer are assets).
    ds = load(sample_cache)
    assert stats["chosen_tokens"] == sum(ds["chosen_len"]) == 43403
    assert stats["rejected_tokens"] == sum(ds["rejected_len"]) == 39319
    assert stats["chosen_trained_tokens"] == sum(map(n_trained, ds["chosen_labels"])) == 17367
    assert stats["rejected_trained_tokens"] == sum(map(n_trained, ds["rejected_labels"])) == 14743


def test_sample_manifest(sample_cache, tmp_path):
    manifest = read_json(sample_cache / "manifest.json")
    tok = load_tokenizer()
    assert manifest["schema_version"] == 1 and manifest["mtdpo_version"] == __version__
    assert manifest["tokenizer"] == {
        "name_or_path": str(EMBEDDED_TOKENIZER),
        "fingerprint": sha256_file(sample_cache / "tokenizer" / "tokenizer.json"),
        "vocab_size": 2048,
        "bos_token_id": tok.convert_tokens_to_ids("<bos>"),
        "eos_token_id": tok.convert_tokens_to_ids("<eos>"),
        "pad_token_id": tok.convert_tokens_to_ids("<pad>"),
    }
    assert manifest["chat_template_sha256"] == sha256_text((EMBEDDED_TOKENIZER / "chat_template.jinja").read_text())
    assert manifest["chat_template_file"] is None
    assert (manifest["mask_mode"], manifest["seed_markers"]) == ("assistant", None)
    assert (manifest["max_length"], manifest["truncation"]) == (2048, "keep_start")
    assert manifest["input"] == {"path": str(SAMPLE_DATA), "format": "jsonl", "sha256": sha256_file(SAMPLE_DATA)}
    stats = read_json(sample_cache / "stats.json")
    assert manifest["counts"] == {k: stats[k] for k in COUNTS}
    assert manifest["tokens"] == {k: stats[k] for k in TOKEN_TOTALS}
    # The fingerprint is the bytes of the cache's tokenizer copy (what show-sample and train read):
    # saving the same tokenizer again gives the same bytes, and the copy has its vocabulary.
    tok.save_pretrained(str(tmp_path / "again"))
    assert tokenizer_fingerprint(tmp_path / "again") == manifest["tokenizer"]["fingerprint"]
    assert vocabulary_hash_dir(sample_cache / "tokenizer") == vocabulary_hash(tok)


def test_fingerprint_changes_with_an_added_special_token(tmp_path, sample_cache):
    tok = load_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>", "<tool_call>"]})
    tok.save_pretrained(str(tmp_path / "tok"))
    run_preprocess(
        write_jsonl(tmp_path / "rows.jsonl", sample_rows(3)), tmp_path / "out", tokenizer=str(tmp_path / "tok")
    )
    manifest = read_json(tmp_path / "out" / "manifest.json")["tokenizer"]
    assert manifest["vocab_size"] == 2049
    assert manifest["fingerprint"] == tokenizer_fingerprint(tmp_path / "tok")
    assert manifest["fingerprint"] != read_json(sample_cache / "manifest.json")["tokenizer"]["fingerprint"]
    assert (
        vocabulary_hash_dir(tmp_path / "out" / "tokenizer")
        == vocabulary_hash(tok)
        != vocabulary_hash_dir(sample_cache / "tokenizer")
    )


def test_shards_have_the_schema_1_column_types(sample_cache):
    ds = load(sample_cache)
    assert len(ds) == 240
    assert {f.name: f.type for f in ds.data.schema} == SCHEMA_1
    assert {f.name: f.type for f in arrow_table(sample_cache).schema} == SCHEMA_1
    assert all(Path(f["filename"]).parent == sample_cache for f in ds.cache_files)  # memory-mapped shards


def test_records_are_consistent(sample_cache):
    ds = load(sample_cache)
    assert ds["row"] == list(range(240))
    for record in ds:
        for side in SIDES:
            ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
            assert record[f"{side}_len"] == len(ids) == len(labels)
            assert all(label in (IGNORE, token) for token, label in zip(ids, labels))  # labels are ids or -100
            assert n_trained(labels) > 0 and labels[0] == IGNORE
        assert record["prompt_len"] == common_prefix(record["chosen_input_ids"], record["rejected_input_ids"])


def test_shards_equal_the_pair_encoder(sample_cache):
    encoder = RowEncoder(embedded_tokenizer(), MaskOptions())
    ds = load(sample_cache)
    for n, row in enumerate(sample_rows(30)):
        record, _ = encoder(row)
        assert {**record, "row": n} == ds[n]


# ── truncation and drops ──────────────────────────────────────────────────────


def expected_after_truncation(full: datasets.Dataset, max_length: int) -> tuple[list[dict], list[int], int]:
    """From the untruncated cache: kept records cut to max_length, dropped rows, truncated count."""
    kept, dropped, truncated = [], [], 0
    for record in full:
        cut = {
            k: record[k][:max_length]
            for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
        }
        if not all(n_trained(cut[f"{side}_labels"]) for side in SIDES):
            dropped.append(record["row"])
            continue
        truncated += max(record["chosen_len"], record["rejected_len"]) > max_length
        cut.update(
            chosen_len=len(cut["chosen_input_ids"]),
            rejected_len=len(cut["rejected_input_ids"]),
            row=record["row"],
            prompt_len=common_prefix(cut["chosen_input_ids"], cut["rejected_input_ids"]),
            problem=record["problem"],  # the messages', not the tokens': truncation keeps it
        )
        kept.append(cut)
    return kept, dropped, truncated


@pytest.mark.parametrize(
    "max_length, kept, dropped, truncated",
    [(200, 240, 0, 127), (128, 191, 49, 173)],
    ids=["truncate", "truncate-and-drop"],
)
def test_truncation_keeps_the_start_and_drops_untrainable_pairs(
    tmp_path, sample_cache, max_length, kept, dropped, truncated
):
    out = tmp_path / "cut"
    stats = run_preprocess(SAMPLE_DATA, out, options=MaskOptions(max_length=max_length))
    assert {k: stats[k] for k in COUNTS} == {
        "rows": 240,
        "kept": kept,
        "rejected": 0,
        "dropped": dropped,
        "truncated": truncated,
    }
    want_records, want_dropped, want_truncated = expected_after_truncation(load(sample_cache), max_length)
    assert (len(want_records), len(want_dropped), want_truncated) == (kept, dropped, truncated)

    ds = load(out)
    assert {f.name: f.type for f in ds.data.schema} == SCHEMA_1
    assert ds.to_list() == want_records
    assert all(n <= max_length for n in [*ds["chosen_len"], *ds["rejected_len"]])
    rejects = read_rejects(out)
    assert [r["row"] for r in rejects] == want_dropped
    reasons = {r["reason"] for r in rejects}
    assert reasons <= {
        f"{side} has no trained token left after truncation to --max-length {max_length}" for side in SIDES
    }
    assert sum(stats["reasons"].values()) == dropped
    assert read_json(out / "manifest.json")["max_length"] == max_length


def test_truncation_that_drops_everything_writes_no_cache(tmp_path):
    out = tmp_path / "cut"
    reason = "240 chosen has no trained token left after truncation to --max-length 16"
    kept = tmp_path / "cut.rejects.jsonl"
    message = f"{SAMPLE_DATA}: kept 0 of 240 rows ({reason}); no cache written; the rejects are in {kept}"
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        run_preprocess(SAMPLE_DATA, out, options=MaskOptions(max_length=16))
    assert not out.exists() and list(tmp_path.iterdir()) == [kept]
    assert [r["row"] for r in map(json.loads, kept.read_text().splitlines())] == list(range(240))


# ── rejects and --strict ──────────────────────────────────────────────────────

Q = msg("user", "What is 2 + 3?")
BAD_UTF8 = b'{"chosen": "\xff"}'
KNOWN = "system, user, assistant, tool, observation, ipython, function"


def mixed_lines() -> tuple[list, dict[int, str], list[int]]:
    """Good rows mixed with bad ones: (lines, {line: reason}, lines of good rows)."""
    good = sample_rows(4)
    lines = [
        good[0],
        "not json",
        good[1],
        "",  # a blank line is skipped, not a row
        {"chosen": good[2]["chosen"]},
        [1, 2],
        {"chosen": [Q, msg("model", "5")], "rejected": [Q, msg("assistant", "6")]},
        {"chosen": good[1]["chosen"], "rejected": good[1]["chosen"]},
        '{"chosen": [], "chosen": [], "rejected": []}',
        BAD_UTF8,
        good[2],
        {"chosen": [Q, {"role": "assistant", "content": None}], "rejected": [Q, msg("assistant", "6")]},
        good[3],
    ]
    reasons = {
        1: "invalid JSON: Expecting value at column 1",
        4: "missing key 'rejected' (row keys: ['chosen'])",
        5: "row is a list, expected a JSON object",
        6: f"chosen[1] has unknown role 'model' (known: {KNOWN})",
        7: "chosen and rejected are identical",
        8: "duplicated key(s) in one object: chosen",
        9: "line is not valid UTF-8 (byte 12)",  # the \xff after '{"chosen": "'
        11: "chosen[1] (assistant) content is null, expected a string or a list of text parts (null only with tool_calls)",
    }
    return lines, reasons, [0, 2, 10, 12]


def test_rejects_are_listed_and_good_rows_kept(tmp_path):
    lines, reasons, good_lines = mixed_lines()
    stats = run_preprocess(write_jsonl(tmp_path / "mixed.jsonl", lines), tmp_path / "mixed")
    assert {k: stats[k] for k in COUNTS} == {"rows": 12, "kept": 4, "rejected": 8, "dropped": 0, "truncated": 0}
    assert read_rejects(tmp_path / "mixed") == [{"row": n, "reason": reason} for n, reason in reasons.items()]
    assert stats["reasons"]["invalid JSON"] == 1 and sum(stats["reasons"].values()) == 8

    run_preprocess(write_jsonl(tmp_path / "good.jsonl", sample_rows(4)), tmp_path / "good")
    mixed, alone = load(tmp_path / "mixed"), load(tmp_path / "good")
    assert mixed["row"] == good_lines and alone["row"] == [0, 1, 2, 3]
    assert mixed.remove_columns("row").to_list() == alone.remove_columns("row").to_list()


def test_strict_stops_at_the_first_bad_row(tmp_path):
    lines, _, _ = mixed_lines()
    with pytest.raises(UsageError) as err:
        run_preprocess(write_jsonl(tmp_path / "mixed.jsonl", lines), tmp_path / "out", strict=True)
    assert str(err.value) == "row 1: invalid JSON: Expecting value at column 1 (--strict stops at the first bad row)"
    assert not (tmp_path / "out").exists()
    assert hidden_leftovers(tmp_path) == []


def test_strict_accepts_a_clean_input(tmp_path):
    stats = run_preprocess(write_jsonl(tmp_path / "rows.jsonl", sample_rows(5)), tmp_path / "out", strict=True)
    assert stats["kept"] == 5


def test_empty_input_is_a_usage_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError, match="holds no rows"):
        run_preprocess(tmp_path / "empty.jsonl", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


# ── input formats ─────────────────────────────────────────────────────────────


def test_every_input_format_gives_the_same_shards(tmp_path):
    import pyarrow.parquet as pq

    rows = sample_rows(20)
    inputs = {
        "jsonl": write_jsonl(tmp_path / "rows.jsonl", rows),
        "json": tmp_path / "rows.json",
        "parquet": tmp_path / "rows.parquet",
        "arrow": tmp_path / "rows_dataset",
    }
    inputs["json"].write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), inputs["parquet"])
    datasets.Dataset.from_list(rows).save_to_disk(str(inputs["arrow"]))
    tables = {}
    for fmt, path in inputs.items():
        run_preprocess(path, tmp_path / f"out-{fmt}")
        assert read_json(tmp_path / f"out-{fmt}" / "manifest.json")["input"]["format"] == fmt
        tables[fmt] = arrow_table(tmp_path / f"out-{fmt}")
    assert tables["jsonl"].num_rows == 20
    for fmt in ("json", "parquet", "arrow"):
        assert tables[fmt].equals(tables["jsonl"]), fmt


def test_parquet_mixing_both_row_shapes(tmp_path, sample_cache):
    """A TRL row first gives the table a `prompt` column, null in the full-conversation rows."""
    import pyarrow.parquet as pq

    trl = {"prompt": [Q], "chosen": [msg("assistant", "It is 5.")], "rejected": [msg("assistant", "It is 6.")]}
    table = pa.Table.from_pylist([trl, *sample_rows(2)])
    assert table.column("prompt").null_count == 2
    pq.write_table(table, tmp_path / "mixed.parquet")
    stats = run_preprocess(tmp_path / "mixed.parquet", tmp_path / "out")
    assert (stats["kept"], stats["rejected"]) == (3, 0), read_rejects(tmp_path / "out")
    full_rows = load(tmp_path / "out").select([1, 2]).remove_columns("row")
    assert full_rows.to_list() == load(sample_cache).select([0, 1]).remove_columns("row").to_list()


# ── num_proc ──────────────────────────────────────────────────────────────────


def test_num_proc_does_not_change_the_output(tmp_path):
    """2,000 generated rows (8 chunks of 256) plus bad lines spread over several chunks."""
    lines: list = list(make_pairs(2000, seed=3))
    for n in (5, 700, 1999):
        lines[n] = "{broken"
    source = write_jsonl(tmp_path / "big.jsonl", lines)
    one = run_preprocess(source, tmp_path / "p1", num_proc=1)
    two = run_preprocess(source, tmp_path / "p2", num_proc=2)
    assert {k: one[k] for k in COUNTS} == {"rows": 2000, "kept": 1997, "rejected": 3, "dropped": 0, "truncated": 0}
    assert {k: two[k] for k in COUNTS + TOKEN_TOTALS} == {k: one[k] for k in COUNTS + TOKEN_TOTALS}
    table = arrow_table(tmp_path / "p1")
    assert table.num_rows == 1997 and table.equals(arrow_table(tmp_path / "p2"))
    for shard in (tmp_path / "p1").glob("data-*.arrow"):
        assert shard.read_bytes() == (tmp_path / "p2" / shard.name).read_bytes()
    assert (tmp_path / "p1" / "rejects.jsonl").read_text() == (tmp_path / "p2" / "rejects.jsonl").read_text()
    assert [r["row"] for r in read_rejects(tmp_path / "p1")] == [5, 700, 1999]


def test_num_proc_must_be_positive(tmp_path):
    with pytest.raises(UsageError, match="--num-proc must be at least 1"):
        run_preprocess(SAMPLE_DATA, tmp_path / "out", num_proc=0)


# ── atomic writes ─────────────────────────────────────────────────────────────


def test_existing_output_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    with pytest.raises(UsageError) as err:
        run_preprocess(SAMPLE_DATA, out)
    assert str(err.value) == f"output {out} already exists; pass --overwrite to replace it"
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert hidden_leftovers(tmp_path) == []


def test_overwrite_replaces_the_output(tmp_path):
    out = tmp_path / "cache"
    run_preprocess(write_jsonl(tmp_path / "a.jsonl", sample_rows(7)), out)
    assert len(load(out)) == 7
    run_preprocess(write_jsonl(tmp_path / "b.jsonl", sample_rows(3)), out, overwrite=True)
    assert len(load(out)) == 3
    assert read_json(out / "manifest.json")["input"]["path"] == str(tmp_path / "b.jsonl")
    assert hidden_leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "cache"
    run_preprocess(write_jsonl(tmp_path / "a.jsonl", sample_rows(7)), out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    lines, _, _ = mixed_lines()
    with pytest.raises(UsageError, match="^row 1: "):
        run_preprocess(write_jsonl(tmp_path / "mixed.jsonl", lines), out, overwrite=True, strict=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("forked", [False, True])
def test_a_failed_tokenizer_copy_fails_the_run_and_leaves_nothing(tmp_path, monkeypatch, forked):
    """Saved in the main process or (large tokenizers) by a forked one: a failure stops the run, with no cache."""
    from transformers import PreTrainedTokenizerBase

    monkeypatch.setattr(pipeline, "BACKGROUND_SAVE_VOCAB", 0 if forked else 10**9)

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(UsageError, match="could not write the tokenizer copy to .*is the disk full"):
        run_preprocess(SAMPLE_DATA, tmp_path / "out")
    assert not (tmp_path / "out").exists() and hidden_leftovers(tmp_path) == []


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    """A crash after some chunks were written leaves no output and no temporary directory."""
    calls = []
    process_chunk = pipeline.process_chunk

    def crash_on_third_chunk(chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return process_chunk(chunk)

    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 64)
    monkeypatch.setattr(pipeline, "process_chunk", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(SAMPLE_DATA, tmp_path / "out")
    assert calls == [64, 64, 64]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_forked_tokenizer_copy_equals_the_in_process_one(tmp_path, monkeypatch):
    run_preprocess(SAMPLE_DATA, tmp_path / "here")
    monkeypatch.setattr(pipeline, "BACKGROUND_SAVE_VOCAB", 0)
    run_preprocess(SAMPLE_DATA, tmp_path / "forked")
    for name in (
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/chat_template.jinja",
        "manifest.json",
    ):
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "forked" / name).read_bytes(), name


def test_the_tokenizer_loads_with_the_collector_paused_and_the_run_leaves_it_as_found(tmp_path, monkeypatch):
    import gc

    seen = []
    load = pipeline.load_tokenizer

    def loading(*args, **kwargs):
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
        return load(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_tokenizer", loading)
    rows = write_jsonl(tmp_path / "rows.jsonl", sample_rows(8))
    assert gc.isenabled() and gc.get_freeze_count() == 0
    pipeline.preprocess(rows, tmp_path / "cache", progress=False, num_proc=2)
    assert seen == [(False, True)]  # paused, what existed before frozen
    assert gc.isenabled() and gc.get_freeze_count() == 0  # a library caller's objects are collected again
    with pytest.raises(UsageError):
        pipeline.preprocess(rows, tmp_path / "other", tokenizer=str(tmp_path / "no-such-tokenizer"), progress=False)
    assert gc.isenabled() and gc.get_freeze_count() == 0  # also after a failed load
