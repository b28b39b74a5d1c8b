"""Reference provenance and caches train must refuse: each refusal one line, exit 2, naming the caches.

Before: `--ref-model` was silently ignored when the cache held precomputed reference
log-probs; mixing caches with and without them was a TypeError in the collator; an eval cache
without them next to a precomputed train cache crashed at the first evaluation (no reference
model); a preprocess that kept 0 pairs exited 0 and train then raised an IndexError.
"""

import json
import shutil

import pytest
from helpers import edit_manifest, invoke
from test_train import logged, run_config
from trainkit import make_cache, precompute, single_turn_rows, tiny_model

from mtdpo.assets import EMBEDDED_TOKENIZER
from mtdpo.cache.files import write_checksums, write_dataset_files
from mtdpo.errors import UsageError
from mtdpo.train import run as run_module
from mtdpo.train.provenance import reference_identity, tiny_model_sha256
from mtdpo.train.run import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A cache, two saved tiny models (seeds 0 and 1), and copies of the cache precomputed with
    the default reference (the tiny model of seed 42) and with model A."""
    tmp = tmp_path_factory.mktemp("provenance")
    cache = make_cache(tmp, n=8)
    models = {}
    for name, seed in (("A", 0), ("B", 1)):
        models[name] = tmp / f"model-{name}"
        tiny_model(seed=seed).save_pretrained(models[name])
        shutil.copytree(EMBEDDED_TOKENIZER, models[name], dirs_exist_ok=True)
    precomputed = {}
    for name, model in (("default", None), ("A", models["A"])):
        precomputed[name] = tmp / f"precomputed-{name}"
        shutil.copytree(cache, precomputed[name])
        precompute(precomputed[name], None if model is None else str(model))
    return tmp, cache, models, precomputed


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def train_cli(tmp, *args):
    return invoke("train", "--output-dir", tmp / "run", "--use-cpu", "--max-steps", "1", "--report-to", "none", *args)


def no_reference_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the precomputed columns serve this run: no reference model may be loaded")

    monkeypatch.setattr(run_module, "load_reference", refuse)


def test_precompute_records_the_reference_path_and_weights(setup):
    _, _, models, precomputed = setup
    recorded = json.loads((precomputed["A"] / "manifest.json").read_text())["reference"]
    assert recorded["path"] == str(models["A"].resolve()) and recorded["columns"] == [
        "ref_chosen_logp",
        "ref_rejected_logp",
    ]
    assert recorded["weights_sha256"] == reference_identity(str(models["A"]), 42)["weights_sha256"]
    assert recorded["weights_sha256"] != reference_identity(str(models["B"]), 42)["weights_sha256"]
    default = json.loads((precomputed["default"] / "manifest.json").read_text())["reference"]
    assert (default["path"], default["seed"], default["weights_sha256"]) == (None, 42, tiny_model_sha256(42))
    assert tiny_model_sha256(42) != tiny_model_sha256(43)


def test_the_recorded_reference_is_used_without_loading_a_model(setup, tmp_path, monkeypatch):
    _, _, models, precomputed = setup
    no_reference_model(monkeypatch)
    train(run_config(precomputed["default"], tmp_path, output_dir=str(tmp_path / "default"), max_steps=1))
    # Model B trained against model A's log-probs: allowed when --ref-model says so.
    train(
        run_config(
            precomputed["A"],
            tmp_path,
            output_dir=str(tmp_path / "a"),
            model=str(models["B"]),
            ref_model=str(models["A"]),
            max_steps=1,
        )
    )
    assert logged(tmp_path / "a")


def test_a_ref_model_that_differs_from_the_recorded_one_is_refused(setup):
    tmp, _, models, precomputed = setup
    line = one_line_error(
        train_cli(tmp, "--data", precomputed["A"], "--model", models["A"], "--ref-model", models["B"])
    )
    assert f"cache {precomputed['A']} holds reference log-probs of {models['A'].resolve()}" in line
    assert f"not of --ref-model {models['B']}" in line and f"--ref-model {models['A'].resolve()}" in line
    # No --ref-model: the reference is --model (here B), not the model that made the columns.
    line = one_line_error(train_cli(tmp, "--data", precomputed["A"], "--model", models["B"]))
    assert f"not of --model {models['B']} (the default reference)" in line
    # The tiny default model of another seed is another reference too.
    line = one_line_error(train_cli(tmp, "--data", precomputed["default"], "--seed", "7"))
    assert "the tiny random model (seed 42)" in line and "pass --seed 42" in line
    assert line.endswith(f"re-run `mtdpo precompute-ref {precomputed['default']} --seed 7`")


def test_caches_with_and_without_reference_columns_are_not_mixed(setup):
    tmp, cache, _, precomputed = setup
    line = one_line_error(train_cli(tmp, "--data", precomputed["default"], cache))
    assert line == (
        f"error: caches {precomputed['default']} and {cache}: the first holds precomputed reference log-probs, the second none; "
        f"run `mtdpo precompute-ref {cache}` with the same reference, or pass caches of one kind"
    )


def test_caches_of_different_references_are_not_mixed(setup):
    tmp, _, _, precomputed = setup
    line = one_line_error(train_cli(tmp, "--data", precomputed["default"], precomputed["A"]))
    assert (
        f"caches {precomputed['default']} and {precomputed['A']} hold reference log-probs of different models" in line
    )


def test_reference_columns_without_a_record_are_refused(setup, tmp_path):
    _, _, _, precomputed = setup
    old = tmp_path / "old"
    shutil.copytree(precomputed["default"], old)
    edit_manifest(
        old,
        lambda m: m.update(reference={"model": "tiny random Gemma (seeded)", "columns": m["reference"]["columns"]}),
    )  # as before
    with pytest.raises(UsageError, match=f"cache {old} holds reference log-probs with no record of the model"):
        train(run_config(old, tmp_path, max_steps=1))


def test_an_eval_cache_without_reference_columns_loads_the_reference(setup, tmp_path):
    """The train cache's columns serve training; the reference model is loaded for evaluation,
    and the eval losses are those of a run that computes every reference log-prob live."""
    _, cache, _, precomputed = setup
    runs = {}
    for name, data in (("mixed", precomputed["default"]), ("live", cache)):
        runs[name] = tmp_path / name
        train(
            run_config(
                data, tmp_path, output_dir=str(runs[name]), eval_data=str(cache), eval_strategy="steps", eval_steps=2
            )
        )
    assert logged(runs["mixed"], "eval_loss") and logged(runs["mixed"], "eval_loss") == pytest.approx(
        logged(runs["live"], "eval_loss"), abs=1e-5
    )
    assert logged(runs["mixed"]) == pytest.approx(logged(runs["live"]), abs=1e-5)


def test_an_eval_cache_of_another_reference_is_refused_before_training(setup):
    tmp, cache, models, precomputed = setup
    line = one_line_error(train_cli(tmp, "--data", cache, "--eval-data", precomputed["A"], "--eval-strategy", "steps"))
    assert f"cache {precomputed['A']} holds reference log-probs of {models['A'].resolve()}" in line
    assert not (tmp / "run" / "metrics.jsonl").exists()


def test_a_preprocess_that_keeps_no_pair_fails_and_leaves_no_cache(tmp_path):
    rows = [{**row, "rejected": row["chosen"]} for row in single_turn_rows(3)] + [{"chosen": "no conversation"}]
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    result = invoke("preprocess", source, "--out", tmp_path / "cache", "--quiet")  # quiet: no summary table
    line = one_line_error(result)
    assert line.startswith(
        f"error: {source}: kept 0 of 5 rows (3 chosen and rejected are identical, "
    ) and line.endswith(f"); no cache written; the rejects are in {tmp_path / 'cache.rejects.jsonl'}")
    # nor any temporary directory; the rejects are beside the would-be cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "cache.rejects.jsonl"]


def test_train_on_an_empty_cache_is_one_line(setup, tmp_path):
    _, cache, _, _ = setup
    from mtdpo.cache.schema import pair_features
    from mtdpo.cache.writer import ShardWriter

    empty = tmp_path / "empty"
    empty.mkdir()
    names = ShardWriter(empty, 1 << 30, pair_features()).close(complete=True)  # the schema, no rows
    write_dataset_files(empty, names, pair_features())
    shutil.copytree(cache / "tokenizer", empty / "tokenizer")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["counts"].update(rows=3, kept=0, rejected=3)  # what an older mtdpo wrote when it kept nothing
    (empty / "manifest.json").write_text(json.dumps(manifest))
    write_checksums(empty, [p.name for p in empty.glob("data-*.arrow")])
    line = one_line_error(train_cli(tmp_path, "--data", empty))
    assert line == f"error: cache {empty} holds no pairs (kept 0 of 3 rows; see {empty / 'rejects.jsonl'})"
