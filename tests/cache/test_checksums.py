"""What checksums.json covers (issue 29, item 10): precompute-ref re-hashes every file of the cache
it reads before it writes new checksums, so it never vouches for changed bytes; manifest.json and
the tokenizer copy are checksummed too, so `train --verify-cache` sees them changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import cache_dataset, edit_manifest
from trainkit import make_cache, precompute

from mtdpo.cache import open_caches
from mtdpo.errors import UsageError

SHARD = "data-00000-of-00001.arrow"


@pytest.fixture
def cache(sample_cache, tmp_path) -> Path:
    return Path(shutil.copytree(sample_cache, tmp_path / "cache"))  # copy2 keeps modification times


def rewrite_keep_mtime(file: Path, old: bytes, new: bytes) -> None:
    """Replace `old` by `new` (same length) and keep the modification time: the stamp cannot see it."""
    st, data = file.stat(), file.read_bytes()
    assert len(old) == len(new) and old in data
    file.write_bytes(data.replace(old, new, 1))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))


def flip_shard_bytes_keep_mtime(shard: Path) -> None:
    data = shard.read_bytes()
    middle = len(data) // 2
    rewrite_keep_mtime(shard, data[middle : middle + 64], bytes(64))


def test_precompute_ref_refuses_a_cache_whose_bytes_changed(cache):
    """main opened the cache trusting the stamp, computed log-probs of the changed rows and
    stamped the result verified."""
    flip_shard_bytes_keep_mtime(cache / SHARD)
    sums = (cache / "checksums.json").read_bytes()
    with pytest.raises(
        UsageError, match=f"^{cache}/{SHARD} is corrupt: its SHA-256 differs from the one in checksums.json$"
    ):
        precompute(cache)
    assert (cache / "checksums.json").read_bytes() == sums and not (cache / "reference").exists()


def test_the_manifest_and_the_tokenizer_copy_are_checksummed(cache):
    sums = json.loads((cache / "checksums.json").read_text())
    names = {
        "manifest.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/chat_template.jinja",
    }
    assert names <= set(sums)


@pytest.mark.parametrize(
    "name, old, new",
    [
        ("manifest.json", b'"max_length": 2048', b'"max_length": 2049'),
        ("tokenizer/chat_template.jinja", b"model", b"MODEL"),
        ("tokenizer/tokenizer_config.json", b'"<eos>"', b'"<pad>"'),
    ],
    ids=["manifest", "chat template", "tokenizer config"],
)
def test_verify_cache_sees_a_changed_manifest_or_tokenizer_copy(cache, name, old, new):
    rewrite_keep_mtime(cache / name, old, new)
    assert len(cache_dataset(cache, verify=True)) == 240  # size and time unchanged: the stamp vouches (its limit)
    with pytest.raises(
        UsageError, match=f"^{cache}/{name} is corrupt: its SHA-256 differs from the one in checksums.json$"
    ):
        open_caches([str(cache)], verify_all=True)  # mtdpo train --verify-cache


def test_an_edited_manifest_is_refused_even_without_verify_cache(cache):
    manifest = cache / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"max_length": 2048', '"max_length": 4096'))
    with pytest.raises(UsageError, match=f"^{cache}/manifest.json is corrupt: its SHA-256 differs"):
        open_caches([str(cache)])  # changed time: hashed at every start


def test_a_forged_stamp_does_not_fool_verify_cache(cache):
    """verified.json only spares re-hashing: --verify-cache re-hashes whatever it says."""
    flip_shard_bytes_keep_mtime(cache / SHARD)
    (cache / "verified.json").write_text((cache / "verified.json").read_text())  # rewritten, same content
    with pytest.raises(UsageError, match=f"^{cache}/{SHARD} is corrupt"):
        open_caches([str(cache)], verify_all=True)


def test_precompute_ref_records_its_manifest(tmp_path):
    cache = make_cache(tmp_path, n=8)
    precompute(cache)
    open_caches([str(cache)], verify_all=True)  # the new manifest and reference files verify
    sums = json.loads((cache / "checksums.json").read_text())
    assert "manifest.json" in sums and any(name.startswith("reference/") for name in sums)
    edit_manifest(cache, lambda m: m.update(max_length=2048))  # a deliberate edit, recorded, passes
    open_caches([str(cache)], verify_all=True)
