"""The cache contract's types: records, the trained-token count, the typed manifest, and the
reference log-probs written beside the token shards."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import cache_dataset

from mtdpo.cache import (
    IGNORE_INDEX,
    Manifest,
    PairRecord,
    ReferenceInfo,
    Sequence,
    open_cache,
    pair_table,
    write_reference,
)
from mtdpo.cache.schema import PAIR_COLUMNS, REFERENCE_COLUMNS
from mtdpo.errors import UsageError

X = IGNORE_INDEX


def test_trained_tokens_never_count_the_first_position():
    assert Sequence([1, 2, 3, 4], [1, X, 3, 4]).trained_tokens == 2  # position 0 is predicted by nothing
    assert Sequence([1, 2], [X, X]).trained_tokens == 0
    assert Sequence([], []).trained_tokens == 0


def test_a_record_round_trips_through_a_shard_row():
    record = PairRecord(Sequence([5, 6, 7], [X, 6, 7]), Sequence([5, 6, 8, 9], [X, 6, 8, 9]), 2, 17)
    row = record.to_row()
    assert list(row) == list(PAIR_COLUMNS)  # the shards' column order
    assert (row["chosen_len"], row["rejected_len"], row["prompt_len"], row["row"]) == (3, 4, 2, 17)
    assert PairRecord.from_row(row) == record
    table = pair_table([record])
    assert table.schema.names == list(PAIR_COLUMNS) and table.to_pylist() == [row]
    with_reference = PairRecord.from_row({**row, REFERENCE_COLUMNS[0]: -1.5, REFERENCE_COLUMNS[1]: -2.5})
    assert with_reference.reference == (-1.5, -2.5)


def test_the_manifest_reads_back_what_it_wrote(sample_cache, tmp_path):
    manifest = Manifest.read(sample_cache)
    assert manifest.kind == "pair" and manifest.pairs == 240 and manifest.reference is None
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    assert json.loads((tmp_path / "manifest.json").read_text()) == json.loads(
        (sample_cache / "manifest.json").read_text()
    )


@pytest.mark.parametrize("key", ["fingerprint", "vocab_size"])
def test_a_manifest_missing_what_readers_need_is_refused_by_name(sample_cache, tmp_path, key):
    data = json.loads((sample_cache / "manifest.json").read_text())
    del data["tokenizer"][key]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match=f"manifest.json is corrupt: it lacks tokenizer.{key}$"):
        Manifest.read(tmp_path)


def test_reference_log_probs_go_beside_the_shards_and_the_shards_stay(sample_cache, tmp_path):
    cache = shutil.copytree(sample_cache, tmp_path / "cache")
    shard = next(cache.glob("data-*.arrow"))
    before = shard.read_bytes()
    opened = open_cache(cache)
    chosen, rejected = [float(-i) for i in range(240)], [float(-2 * i) for i in range(240)]
    info = ReferenceInfo(model="m", path="/m", weights_sha256="ab" * 32, columns=list(REFERENCE_COLUMNS))
    write_reference(cache, opened.manifest, chosen, rejected, info)
    assert shard.read_bytes() == before
    reopened = open_cache(cache, verify=True, full=True)  # checksums.json covers reference/ too
    assert reopened.has_reference and reopened.manifest.reference == info
    assert reopened.record(3).reference == (-3.0, -6.0)
    assert "reference/data-00000-of-00001.arrow" in json.loads((cache / "checksums.json").read_text())


def test_a_reference_the_manifest_does_not_name_is_ignored(sample_cache, tmp_path):
    """What a crash between renaming reference/ into place and replacing manifest.json (then
    checksums.json) leaves."""
    cache = shutil.copytree(sample_cache, tmp_path / "cache")
    manifest = open_cache(cache).manifest
    before = {name: (cache / name).read_bytes() for name in ("manifest.json", "checksums.json")}
    info = ReferenceInfo(model="m", weights_sha256="ab" * 32, columns=list(REFERENCE_COLUMNS))
    write_reference(cache, manifest, [0.0] * 240, [0.0] * 240, info)
    for name, data in before.items():  # the two files as they were before the reference
        (cache / name).write_bytes(data)
    assert not open_cache(cache).has_reference
    assert set(REFERENCE_COLUMNS).isdisjoint(cache_dataset(cache).column_names)
