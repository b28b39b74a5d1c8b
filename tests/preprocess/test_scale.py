"""Scale-out inputs: --shard I/N slices, several caches as one dataset, a directory of files,
a `datasets` hub name (docs/SCALING.md)."""

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, SplitDict, SplitInfo
from helpers import cache_dataset, run_preprocess, sample_rows, write_jsonl
from trainkit import REPO, logged

from mtdpo.cache import expand_cache_paths, open_caches
from mtdpo.errors import UsageError
from mtdpo.preprocess.sources import Source, _load_hub, open_source
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.run import train

COLUMNS = [
    "chosen_input_ids",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_labels",
    "prompt_len",
    "chosen_len",
    "rejected_len",
    "row",
]


def columns(cache_or_dataset) -> dict:
    ds = cache_dataset(cache_or_dataset) if not isinstance(cache_or_dataset, Dataset) else cache_or_dataset
    return ds.select_columns(COLUMNS).to_dict()


def rows_with_faults() -> list:
    """30 sample pairs with a blank line (row 7) and an unusable row (row 22): 32 row numbers."""
    rows = sample_rows(30)
    return [*rows[:7], "", *rows[7:21], {"chosen": "no prompt"}, *rows[21:]]


@pytest.fixture(scope="module")
def split_input(tmp_path_factory):
    """One input, its cache, and the caches of its three slices."""
    tmp = tmp_path_factory.mktemp("scale")
    data = write_jsonl(tmp / "pairs.jsonl", rows_with_faults())
    run_preprocess(data, tmp / "whole")
    for i in range(3):
        run_preprocess(data, tmp / f"part-{i}", shard=f"{i}/3")
    return tmp, data


def run_config(data, out, **overrides):
    values = dict(
        data=data,
        output_dir=str(out),
        use_cpu=True,
        max_steps=3,
        logging_steps=1,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        learning_rate=1e-3,
    )
    return MtdpoConfig(**{**values, **overrides})


def test_three_slices_are_the_whole_input_in_order(split_input):
    tmp, _ = split_input
    manifests = [json.loads((tmp / f"part-{i}" / "manifest.json").read_text()) for i in range(3)]
    # 32 row numbers: [0, 10), [10, 21), [21, 32); the blank line 7 and the bad row 22 count as rows
    assert [m["shard"] for m in manifests] == [
        {"index": i, "count": 3, "rows": rows, "input_rows": 32} for i, rows in enumerate(([0, 10], [10, 21], [21, 32]))
    ]
    assert [m["counts"] for m in manifests] == [
        {"rows": 9, "kept": 9, "rejected": 0, "dropped": 0, "truncated": 0},
        {"rows": 11, "kept": 11, "rejected": 0, "dropped": 0, "truncated": 0},
        {"rows": 11, "kept": 10, "rejected": 1, "dropped": 0, "truncated": 0},
    ]
    assert (tmp / "part-2" / "rejects.jsonl").read_text().startswith('{"row": 22, "reason": ')
    whole = json.loads((tmp / "whole" / "manifest.json").read_text())
    assert whole["shard"] is None and {m["input"]["sha256"] for m in manifests} == {whole["input"]["sha256"]}

    joined = open_caches([str(tmp / f"part-{i}") for i in range(3)]).dataset
    assert len(joined) == 30 and columns(joined) == columns(tmp / "whole")  # row numbers stay global


def test_training_on_the_slices_equals_training_on_the_whole(split_input):
    tmp, _ = split_input
    train(run_config([str(tmp / "whole")], tmp / "run-whole"))
    train(run_config([str(tmp / "part-*")], tmp / "run-parts"))  # a quoted glob on the command line
    whole, parts = logged(tmp / "run-whole"), logged(tmp / "run-parts")
    assert sorted(whole) == [1, 2, 3] and whole == parts  # length-grouped batches, same seed: bit for bit
    assert len(set(whole.values())) == 3


def test_glob_expands_in_name_order_and_must_match(split_input, tmp_path):
    tmp, _ = split_input
    assert expand_cache_paths([str(tmp / "part-*"), str(tmp / "whole")]) == [
        *(str(tmp / f"part-{i}") for i in range(3)),
        str(tmp / "whole"),
    ]
    with pytest.raises(UsageError, match=r"^--data .*/nothing-\*: no cache matches this pattern$"):
        expand_cache_paths([str(tmp_path / "nothing-*")])


def test_caches_that_disagree_are_refused_naming_both(split_input):
    tmp, data = split_input
    run_preprocess(data, tmp / "part-1-short", shard="1/3", options=_options(max_length=64))
    run_preprocess(data, tmp / "part-1-seed", shard="1/3", options=_options(mode="seed"))
    for other, field in (("part-1-short", "max_length"), ("part-1-seed", "mask_mode")):
        with pytest.raises(UsageError) as err:
            open_caches([str(tmp / "part-0"), str(tmp / other)])
        assert str(err.value) == f"caches {tmp / 'part-0'} and {tmp / other} disagree on {field}; preprocess them alike"
    with pytest.raises(UsageError) as err:
        open_caches([str(tmp / "part-0"), str(tmp / "part-1"), str(tmp / "part-0")])
    assert (
        str(err.value)
        == f"caches {tmp / 'part-0'} and {tmp / 'part-0'} are the same slice (0/3) of one input; pass each once"
    )


def _options(**kwargs):
    from mtdpo.preprocess.records import MaskOptions

    return MaskOptions(**kwargs)


def comparable(rows):
    """(row number, row or the error's type and text): RowErrors compare by what they say."""
    return [(n, (type(row).__name__, str(row)) if isinstance(row, Exception) else row) for n, row in rows]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_slice_reads_as_the_whole_file_filtered(tmp_path, fmt):
    """A reader given a slice skips the rows before it without parsing them: on the fault
    corpus (BOMs, blank lines, CRLF, bad JSON, deep nesting …) it must give what reading the
    whole file and keeping the slice gives."""
    from mtdpo.preprocess.sources import READERS

    path = REPO / "tests/data/faults.jsonl"
    if fmt == "parquet":  # 2,100 rows: two batches of 1,024 and a short one
        path = tmp_path / "rows.parquet"
        pq.write_table(pa.Table.from_pylist([{"i": i, "text": "x" * (i % 7)} for i in range(2100)]), path)
    whole = list(READERS[fmt](path))
    total = whole[-1][0] + 1
    for start, stop in [(0, total), (0, 1), (1, 7), (5, total), (total - 1, total), (1000, 1100), (1023, 2049), (7, 7)]:
        expected = [(n, row) for n, row in whole if start <= n < stop]
        assert comparable(READERS[fmt](path, start, stop)) == comparable(expected), (start, stop)


def test_bad_shard_values(tmp_path):
    data = write_jsonl(tmp_path / "x.jsonl", sample_rows(2))
    for bad in ("3/3", "1", "-1/2", "a/b", "1/0"):
        with pytest.raises(UsageError, match=r"^--shard takes I/N with 0 <= I < N"):
            run_preprocess(data, tmp_path / "out", shard=bad)
    with pytest.raises(
        UsageError, match=r"--shard 0/3 holds no rows; no cache written$"
    ):  # 2 rows in 3 slices: the first is empty
        run_preprocess(data, tmp_path / "empty-slice", shard="0/3")
    assert not (tmp_path / "empty-slice").exists()


def test_directory_of_files_reads_as_their_concatenation(tmp_path):
    """jsonl, json and parquet files in sorted path order (subfolders too), other files ignored."""
    rows = rows_with_faults()  # 32 row numbers
    (tmp_path / "in" / "b").mkdir(parents=True)
    write_jsonl(tmp_path / "in" / "a-00.jsonl", rows[:12])  # rows 0-11, the blank line 7 included
    pq.write_table(pa.Table.from_pylist(rows[12:20]), tmp_path / "in" / "a-01.parquet")  # 12-19
    (tmp_path / "in" / "b" / "c.json").write_text(json.dumps(rows[20:26]))  # 20-25, the bad row 22 included
    write_jsonl(tmp_path / "in" / "b" / "d.ndjson", rows[26:])  # 26-31
    (tmp_path / "in" / "README.md").write_text("not data")
    (tmp_path / "in" / ".hidden.jsonl").write_text("{}\n")
    run_preprocess(write_jsonl(tmp_path / "all.jsonl", rows), tmp_path / "single")

    run_preprocess(tmp_path / "in", tmp_path / "dir")
    assert columns(tmp_path / "dir") == columns(tmp_path / "single")
    manifest = json.loads((tmp_path / "dir" / "manifest.json").read_text())
    assert manifest["input"]["format"] == "directory"
    assert [(f["name"], f["format"], f["first_row"], f["rows"]) for f in manifest["input"]["files"]] == [
        ("a-00.jsonl", "jsonl", 0, 12),
        ("a-01.parquet", "parquet", 12, 8),
        ("b/c.json", "json", 20, 6),
        ("b/d.ndjson", "jsonl", 26, 6),
    ]
    reject = json.loads((tmp_path / "dir" / "rejects.jsonl").read_text())
    assert reject["row"] == 22 and reject["file"] == "b/c.json" and reject["file_row"] == 2
    with pytest.raises(UsageError, match=r"^row 22 \(b/c.json row 2\): missing key 'rejected'"):
        run_preprocess(tmp_path / "in", tmp_path / "strict", strict=True)

    # a slice across file boundaries: rows [10, 21) come from three files
    run_preprocess(tmp_path / "in", tmp_path / "dir-1", shard="1/3")
    assert columns(tmp_path / "dir-1")["row"] == [10, 11, *range(12, 20), 20]


def test_directory_changes_change_the_input_hash(tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", sample_rows(2))
    write_jsonl(tmp_path / "in" / "b.jsonl", sample_rows(3)[2:])
    hashes = []
    for rename in ("b.jsonl", "c.jsonl"):  # the same files, another order
        (tmp_path / "in" / "b.jsonl").rename(tmp_path / "in" / rename)
        source = open_source(tmp_path / "in")
        source.count_rows()
        hashes.append(source.describe()["sha256"])
    assert hashes[0] != hashes[1]


def streamed_pairs(n: int, announce_rows: bool):
    """What `load_dataset(..., streaming=True)` returns: an IterableDataset, whose info gives
    the split's row count when the dataset card has it."""
    stream = Dataset.from_list(sample_rows(n)).to_iterable_dataset()
    if announce_rows:
        stream.info.splits = SplitDict({"train": SplitInfo("train", num_examples=n)})
    return stream


def test_hub_name_is_streamed_with_load_dataset(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, split=None, streaming=False):
        calls.append((name, split, streaming))
        return streamed_pairs(12, announce_rows=True)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    run_preprocess(write_jsonl(tmp_path / "pairs.jsonl", sample_rows(12)), tmp_path / "file")
    run_preprocess("someone/math-pairs", tmp_path / "hub", split="train")
    run_preprocess("someone/math-pairs", tmp_path / "hub-2", split="train", shard="2/3")
    assert calls == [("someone/math-pairs", "train", True)] * 2
    assert columns(tmp_path / "hub") == columns(tmp_path / "file")
    assert columns(tmp_path / "hub-2")["row"] == list(range(8, 12))
    manifest = json.loads((tmp_path / "hub-2" / "manifest.json").read_text())
    assert manifest["input"] == {"path": "someone/math-pairs", "format": "hub", "sha256": None, "split": "train"}
    assert manifest["shard"] == {"index": 2, "count": 3, "rows": [8, 12], "input_rows": 12}


def test_hub_stream_without_a_row_count(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, streaming: streamed_pairs(5, announce_rows=False))
    stats = run_preprocess("someone/math-pairs", tmp_path / "hub")
    assert stats["rows"] == stats["kept"] == 5
    with pytest.raises(
        UsageError,
        match=r"^--shard needs the row count of the input, which the streamed dataset someone/math-pairs does not give",
    ):
        run_preprocess("someone/math-pairs", tmp_path / "hub-0", shard="0/2")


def test_unknown_hub_name_and_missing_files_say_input_not_found(tmp_path, monkeypatch):
    def offline(name, split, streaming):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError) as err:
        run_preprocess("nobody/nothing", tmp_path / "out")
    assert str(err.value) == (
        "input not found: nobody/nothing is not a local path, and `datasets` cannot load it "
        "(ConnectionError: Couldn't reach 'nobody/nothing' on the Hub (OfflineModeIsEnabled))"
    )
    for local in ("missing.jsonl", str(tmp_path / "missing"), "./missing"):
        with pytest.raises(UsageError, match=f"^input not found: {Path(local)}$"):
            run_preprocess(local, tmp_path / "out")


def test_real_load_dataset_streams_a_local_dataset_folder(tmp_path):
    """The hub code path with the real `datasets.load_dataset` (offline: a local folder of files)."""
    (tmp_path / "repo").mkdir()
    write_jsonl(tmp_path / "repo" / "train.jsonl", rows := sample_rows(6))
    source = Source("repo", "hub", split="train", hub=_load_hub(str(tmp_path / "repo"), "train"))
    source.count_rows()
    assert [n for n, _ in source.read()] == list(range(6))
    assert [row["chosen"] for _, row in source.read()] == [row["chosen"] for row in rows]


def test_preprocess_cli_names_slices_so_they_sort(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mtdpo.cli import app

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "pairs.jsonl", sample_rows(12))
    for i in (10, 2):
        result = CliRunner().invoke(app, ["preprocess", "pairs.jsonl", "--shard", f"{i}/12", "--quiet"])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "data_cache").iterdir()) == [
        "pairs-shard-02-of-12",
        "pairs-shard-10-of-12",
    ]
    assert json.loads((tmp_path / "data_cache" / "pairs-shard-10-of-12" / "manifest.json").read_text())["shard"][
        "rows"
    ] == [10, 11]
