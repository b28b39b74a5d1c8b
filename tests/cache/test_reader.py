"""Stage one writes its shards while streaming and loads the tokenizer once; stage two verifies
a cache's checksums once, then trusts a size/mtime stamp; fingerprints are file-byte hashes."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import datasets
import pytest
from helpers import cache_dataset, run_preprocess, write_jsonl

from mtdpo.assets import EMBEDDED_TOKENIZER, SAMPLE_DATA
from mtdpo.cache import check_model_matches, open_cache, open_caches
from mtdpo.cache import files as cache_files
from mtdpo.cache import reader as cache_reader
from mtdpo.cache import writer as cache_writer
from mtdpo.errors import UsageError
from mtdpo.fingerprint import same_tokenizer, tokenizer_fingerprint, vocabulary_hash_dir
from mtdpo.synthetic import make_pairs

SHARD = "data-00000-of-00001.arrow"


def columns(cache: Path) -> dict:
    return datasets.load_from_disk(str(cache)).to_dict()


# ── shards written while streaming ────────────────────────────────────────────


def test_small_shards_hold_the_same_pairs_for_any_num_proc(tmp_path, monkeypatch):
    """600 pairs in record batches of 64 (~180 kB) into 500 kB shards: several files, named as
    save_to_disk names them, each under the limit, the same rows in the same order as one big
    shard, byte-equal for 1 and 2 processes."""

    monkeypatch.setattr(cache_writer, "BATCH_ROWS", 64)
    source = write_jsonl(tmp_path / "rows.jsonl", list(make_pairs(600, seed=7)))
    run_preprocess(source, tmp_path / "one")
    run_preprocess(source, tmp_path / "small", max_shard_size="500KB")
    run_preprocess(source, tmp_path / "small2", max_shard_size="500KB", num_proc=2)
    names = sorted(p.name for p in (tmp_path / "small").glob("data-*.arrow"))
    assert len(names) > 2 and names == [f"data-{i:05d}-of-{len(names):05d}.arrow" for i in range(len(names))]
    assert json.loads((tmp_path / "small" / "state.json").read_text())["_data_files"] == [
        {"filename": n} for n in names
    ]
    assert all((tmp_path / "small" / n).stat().st_size <= 500_000 for n in names)
    assert columns(tmp_path / "small") == columns(tmp_path / "one")
    assert len(columns(tmp_path / "one")["row"]) == 600
    for name in [*names, "state.json", "checksums.json", "dataset_info.json"]:
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "small2" / name).read_bytes(), name


def test_a_run_that_keeps_nothing_writes_no_cache(tmp_path):
    """Train would refuse an empty cache: preprocess says why there is none (the top reasons)."""
    source = write_jsonl(tmp_path / "bad.jsonl", ["{broken", "[]"])
    with pytest.raises(
        UsageError,
        match=re.escape(
            f"{source}: kept 0 of 2 rows (1 invalid JSON, 1 row is a list, expected a JSON object); no cache written"
        ),
    ):
        run_preprocess(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out.rejects.jsonl"]


def test_a_bad_shard_size_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="^--max-shard-size 'big': give a size such as 500MB"):
        run_preprocess(SAMPLE_DATA, tmp_path / "out", max_shard_size="big")


@pytest.mark.parametrize("num_proc", [1, 2])
def test_the_tokenizer_is_loaded_once(tmp_path, monkeypatch, num_proc):
    """Workers fork from the main process and share its tokenizer: one load per run."""
    from transformers import AutoTokenizer

    loads = []
    original = AutoTokenizer.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counting))
    run_preprocess(SAMPLE_DATA, tmp_path / "out", num_proc=num_proc)
    assert loads == [str(EMBEDDED_TOKENIZER)]


# ── checksums verified once, then a stamp ─────────────────────────────────────


@pytest.fixture
def cache(sample_cache, tmp_path) -> Path:
    return Path(shutil.copytree(sample_cache, tmp_path / "cache"))  # copy2 keeps modification times


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Names of the files open_cache reads in full to hash them."""
    names = []
    original = cache_files.sha256_file

    def counting(path):
        names.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(cache_files, "sha256_file", counting)
    return names


def flip_bytes_keep_mtime(file: Path) -> None:
    """Same size, same modification time, different bytes: only a full check can see it."""
    st = file.stat()
    data = bytearray(file.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    file.write_bytes(bytes(data))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_cache_as_preprocess_left_it_is_not_hashed_again(cache, hashed):
    assert len(cache_dataset(cache, verify=True)) == 240
    assert hashed == []


def test_shards_are_read_to_their_end_only_when_a_file_changed(cache, monkeypatch):
    walked = []
    original = cache_reader.check_shard
    monkeypatch.setattr(cache_reader, "check_shard", lambda shard: walked.append(shard.name) or original(shard))
    cache_dataset(cache, verify=True)
    assert walked == []  # as preprocess stamped it: stat calls only, whatever the cache's size
    os.utime(cache / SHARD)
    cache_dataset(cache, verify=True)
    assert walked == [SHARD]


def test_a_changed_file_is_hashed_and_a_good_one_stamped_again(cache, hashed):
    os.utime(cache / SHARD)  # touched: same bytes, new modification time
    cache_dataset(cache, verify=True)
    listed = [SHARD, "manifest.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert hashed == [*listed, "dataset_info.json"]  # every listed file, once
    cache_dataset(cache, verify=True)
    assert hashed == [*listed, "dataset_info.json"]  # stamped again: not hashed a second time


def test_full_verification_sees_what_the_stamp_cannot(cache, hashed):
    flip_bytes_keep_mtime(cache / SHARD)
    cache_dataset(cache, verify=True)  # size and mtime unchanged: trusted (the stamp's limit)
    with pytest.raises(UsageError, match=f"^{cache}/{SHARD} is corrupt: its SHA-256 differs"):
        cache_dataset(cache, verify=True, full=True)
    with pytest.raises(UsageError, match=f"^{cache}/{SHARD} is corrupt: its SHA-256 differs"):
        open_caches([str(cache)], verify_all=True)  # mtdpo train --verify-cache


def test_a_missing_or_damaged_stamp_means_a_full_check(cache, hashed):
    flip_bytes_keep_mtime(cache / SHARD)
    (cache / "verified.json").write_text("{")
    with pytest.raises(UsageError, match="is corrupt: its SHA-256 differs"):
        cache_dataset(cache, verify=True)
    (cache / "verified.json").unlink()
    with pytest.raises(UsageError, match="is corrupt: its SHA-256 differs"):
        cache_dataset(cache, verify=True)


def test_rewritten_checksums_invalidate_the_stamp(cache, hashed):
    sums = json.loads((cache / "checksums.json").read_text())
    sums[SHARD]["sha256"] = "0" * 64
    (cache / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(UsageError, match="is corrupt: its SHA-256 differs"):
        cache_dataset(cache, verify=True)


# ── fingerprints from file bytes ──────────────────────────────────────────────


def resaved(source: Path, target: Path, indent: int | None) -> Path:
    """The same tokenizer with its tokenizer.json written in another layout (other bytes)."""
    shutil.copytree(source, target)
    data = json.loads((source / "tokenizer.json").read_text())
    (target / "tokenizer.json").write_text(json.dumps(data, indent=indent))
    return target


def test_the_fingerprint_is_the_copy_s_bytes_and_a_layout_change_is_no_mismatch(cache, tmp_path):
    manifest = json.loads((cache / "manifest.json").read_text())
    fingerprint = manifest["tokenizer"]["fingerprint"]
    assert fingerprint == tokenizer_fingerprint(cache / "tokenizer") == tokenizer_fingerprint(EMBEDDED_TOKENIZER)
    other_layout = resaved(EMBEDDED_TOKENIZER, tmp_path / "compact", indent=None)
    assert tokenizer_fingerprint(other_layout) != fingerprint
    assert same_tokenizer(fingerprint, cache / "tokenizer", other_layout)  # vocabulary hash decides
    check_model_matches(open_cache(cache), str(other_layout), 2048, False)


def test_a_different_vocabulary_is_refused(cache, tmp_path):
    manifest = json.loads((cache / "manifest.json").read_text())
    other = resaved(EMBEDDED_TOKENIZER, tmp_path / "other", indent=2)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first = next(iter(vocab)) if isinstance(vocab, dict) else None
    if isinstance(vocab, dict):
        vocab[first + "x"] = vocab.pop(first)
    else:
        vocab[0] = [vocab[0][0] + "x", *vocab[0][1:]]
    (other / "tokenizer.json").write_text(json.dumps(data))
    assert not same_tokenizer(manifest["tokenizer"]["fingerprint"], cache / "tokenizer", other)
    with pytest.raises(UsageError, match="differs from the cache's"):
        check_model_matches(open_cache(cache), str(other), 2048, False)


def test_a_manifest_holding_the_old_vocabulary_hash_still_matches(cache, tmp_path):
    """Caches written before fingerprints were byte hashes hold the vocabulary hash."""
    old = vocabulary_hash_dir(cache / "tokenizer")
    other_layout = resaved(EMBEDDED_TOKENIZER, tmp_path / "compact", indent=None)
    assert same_tokenizer(old, cache / "tokenizer", other_layout)
    assert not same_tokenizer("0" * 64, cache / "tokenizer", other_layout)  # the copy is not what it names
