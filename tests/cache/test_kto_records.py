"""The kto record kind: its record type and columns, the manifest that names the kind, the
reference columns beside the shards, and the handle's view of a KTO cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from trainkit import make_cache, make_kto_cache

from mtdpo.cache import (
    IGNORE_INDEX,
    KtoRecord,
    Manifest,
    ReferenceInfo,
    Sequence,
    kto_table,
    open_cache,
    open_caches,
    write_reference_columns,
)
from mtdpo.cache.schema import KTO_COLUMNS, first_trained
from mtdpo.errors import UsageError

X = IGNORE_INDEX


@pytest.fixture(scope="module")
def kto_cache(tmp_path_factory):
    return make_kto_cache(tmp_path_factory.mktemp("kto-cache"), n=4)  # 8 rows


def test_a_kto_record_round_trips_through_a_shard_row():
    record = KtoRecord(Sequence([2, 5, 6, 7, 8], [X, X, 6, X, 8]), False, 2, 41, problem=-7)
    row = record.to_row()
    assert list(row) == list(KTO_COLUMNS) == ["input_ids", "labels", "label", "prompt_len", "length", "row", "problem"]
    assert (row["label"], row["prompt_len"], row["length"], row["row"], row["problem"]) == (False, 2, 5, 41, -7)
    assert KtoRecord.from_row(row) == record and record.group == "undesirable"
    assert kto_table([record]).to_pylist() == [row]
    with_reference = KtoRecord.from_row({**row, "ref_logp": -1.5, "ref_kl_logp": -2.5})
    assert with_reference.reference == (-1.5, -2.5)
    assert record.side("undesirable") == record.sequence
    with pytest.raises(KeyError):
        record.side("desirable")


def test_prompt_len_is_the_tokens_before_the_first_trained_one():
    assert first_trained([X, X, X, 4, 5, X, 7]) == 3
    assert first_trained([1, X, 3]) == 2  # position 0 is predicted by nothing: never trained
    assert first_trained([X, X]) == 2


def test_the_manifest_names_the_kind_and_counts_the_labels(kto_cache, tmp_path):
    manifest = Manifest.read(kto_cache)
    assert manifest.kind == "kto" and manifest.unit == "row" and manifest.pairs == 8
    assert manifest.counts["desirable"] == manifest.counts["undesirable"] == 4
    assert set(manifest.tokens) == {
        "desirable_tokens",
        "undesirable_tokens",
        "desirable_trained_tokens",
        "undesirable_trained_tokens",
    }
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    data = json.loads((kto_cache / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "kind": "triple"}))
    with pytest.raises(UsageError, match=r"record kind 'triple', this mtdpo reads pair and kto"):
        Manifest.read(tmp_path)


def test_the_handle_reads_a_kto_cache_column_wise(kto_cache):
    cache = open_cache(kto_cache)
    assert cache.is_kto and len(cache) == 8 and not cache.has_reference
    record = cache.record(3)
    assert isinstance(record, KtoRecord) and record.desirable is False
    assert cache.desirable().tolist() == [True, False] * 4
    assert cache.lengths()[3] == len(record.sequence)
    ids, labels = cache.token_columns()
    assert ids[3].as_py() == record.sequence.input_ids and labels[3].as_py() == record.sequence.labels
    assert cache.token_ids_of(3, 4) == {"sequence": [record.sequence.input_ids]}
    assert np.array_equal(cache.prompt_lengths(), [cache.record(i).prompt_len for i in range(8)])


def test_mixing_kinds_in_one_run_is_refused_in_one_line(kto_cache, tmp_path):
    pairs = make_cache(tmp_path, n=2)
    with pytest.raises(
        UsageError, match=rf"^{kto_cache} is a KTO cache and {pairs} a pair cache: train them in separate runs$"
    ):
        open_caches([str(kto_cache), str(pairs)])
    with pytest.raises(UsageError, match=rf"^{pairs} is a pair cache and {kto_cache} a KTO cache"):
        open_caches([str(pairs), str(kto_cache)])
    assert len(open_caches([str(kto_cache), str(kto_cache)])) == 16  # two KTO caches are one dataset


def test_kto_reference_columns_go_beside_the_shards(kto_cache, tmp_path):
    import shutil

    cache = tmp_path / "with-ref"
    shutil.copytree(kto_cache, cache)
    manifest = Manifest.read(cache)
    info = ReferenceInfo(model="m", columns=["ref_logp", "ref_kl_logp"], kl_batch_size=4)
    rows, kl = [-float(i) for i in range(8)], [-10.0 - i for i in range(8)]
    updated = write_reference_columns(cache, manifest, [rows, kl], info)
    assert updated.reference.kl_batch_size == 4
    assert json.loads((cache / "manifest.json").read_text())["reference"]["kl_batch_size"] == 4
    opened = open_cache(cache)
    assert opened.has_reference and opened.record(2).reference == (-2.0, -12.0)
    with pytest.raises(ValueError, match="reference columns are"):
        write_reference_columns(cache, manifest, {"ref_chosen_logp": rows, "ref_rejected_logp": kl}, info)


def test_a_pair_manifest_keeps_no_kl_batch_size(tmp_path):
    info = ReferenceInfo(model="m")
    pairs = make_cache(tmp_path, n=2)
    data = json.loads(Manifest.read(pairs).with_reference(info).to_json())
    assert "kl_batch_size" not in data["reference"]


def test_unpaired_rows_make_a_kto_cache_with_their_own_masks(tmp_path):
    """A whole trajectory and TRL's prompt/completion shape mask alike: the prompt (messages before
    the first assistant one) untrained, every assistant turn after it trained."""
    question = {"role": "user", "content": "What is 6 * 7?"}
    call = {"role": "assistant", "content": "```python\nprint(6 * 7)\n```"}
    tool = {"role": "tool", "content": "```output\n42\n```"}
    answer = {"role": "assistant", "content": "\\boxed{42}"}
    rows = [
        {"messages": [question, call, tool, answer], "label": True, "prompt_id": "p", "reward": 1.0},
        {"prompt": [question], "completion": [call, tool, answer], "label": True},
        {"prompt": "What is 6 * 7?", "completion": "\\boxed{42}", "label": False},
    ]
    cache = make_cache(tmp_path, rows, name="shapes")
    opened = open_cache(cache)
    a, b, c = (opened.record(i) for i in range(3))
    assert a.sequence == b.sequence and a.prompt_len == b.prompt_len and (a.desirable, c.desirable) == (True, False)
    tok = opened.load_tokenizer()
    trained = [tok.decode([t for t, label in zip(a.sequence.input_ids, a.sequence.labels) if label != X])]
    assert trained == ["```python\nprint(6 * 7)\n```<end_of_turn>\\boxed{42}<end_of_turn>"]
    assert tok.decode(a.sequence.input_ids[: a.prompt_len]).endswith("<start_of_turn>model\n")
