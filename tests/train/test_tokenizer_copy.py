"""What train puts next to the model from the cache's tokenizer copy (issue 29, item 12): the known
tokenizer files only, regular files only (a symlink is refused, never followed), and no code
(auto_map, *.py) unless preprocess ran with --trust-remote-code, which the manifest records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import edit_manifest
from trainkit import make_cache

from mtdpo.cache import open_caches
from mtdpo.cache.files import record_checksums
from mtdpo.errors import UsageError
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.run import train

TOKENIZER_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("tok"), n=4)


@pytest.fixture
def cache(clean_cache, tmp_path) -> Path:
    return Path(shutil.copytree(clean_cache, tmp_path / "cache", symlinks=True))


def run_config(cache: Path, out: Path) -> MtdpoConfig:
    return MtdpoConfig(
        data=[str(cache)],
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        max_steps=1,
        save_strategy="no",
        report_to="none",
    )


def with_remote_code(cache: Path, code_file: bool = True) -> Path:
    """The tokenizer copy of a custom tokenizer: an auto_map and (`code_file`) its code, checksums
    recorded (as a cache made from such a tokenizer has them)."""
    config = cache / "tokenizer" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    config.write_text(json.dumps(data))
    changed = ["tokenizer/tokenizer_config.json"]
    if code_file:
        (cache / "tokenizer" / "evil.py").write_text("import os\nos.system('touch /tmp/pwned')\n")
        changed.append("tokenizer/evil.py")
    record_checksums(cache, changed)
    return cache


def test_a_symlink_in_the_tokenizer_copy_is_refused_before_training(cache, tmp_path):
    """main copied with copytree, following the link: the private file ended up in the model folder."""
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (cache / "tokenizer" / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(UsageError, match=r"special_tokens_map.json in the cache's tokenizer copy is a symlink"):
        train(run_config(cache, tmp_path / "run"))
    assert not (tmp_path / "run" / "special_tokens_map.json").exists()
    assert not (tmp_path / "run" / "model.safetensors").exists()  # refused before any step


def test_tokenizer_code_is_refused_without_trust_remote_code(cache, tmp_path):
    with_remote_code(cache)
    with pytest.raises(UsageError) as err:
        train(run_config(cache, tmp_path / "run"))
    assert "evil.py" in str(err.value) and "--trust-remote-code" in str(err.value)
    assert not (tmp_path / "run" / "evil.py").exists()


def test_an_auto_map_alone_is_refused_without_trust_remote_code(cache):
    with_remote_code(cache, code_file=False)
    with pytest.raises(UsageError, match=r"tokenizer_config.json names tokenizer code \(auto_map\)"):
        open_caches([str(cache)]).tokenizer_copy()


def test_tokenizer_code_is_copied_when_preprocess_trusted_it(cache, tmp_path):
    edit_manifest(with_remote_code(cache), lambda m: m.update(trust_remote_code=True))
    open_caches([str(cache)]).copy_tokenizer(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted([*TOKENIZER_FILES, "evil.py"])


def test_only_the_known_tokenizer_files_go_next_to_the_model(cache, tmp_path):
    (cache / "tokenizer" / "notes.txt").write_text("not a tokenizer file")
    (cache / "tokenizer" / "nested").mkdir()
    (cache / "tokenizer" / "nested" / "tokenizer.json").write_text("{}")
    train(run_config(cache, tmp_path / "run"))
    copied = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name in TOKENIZER_FILES or p.suffix == ".txt")
    assert copied == TOKENIZER_FILES and not (tmp_path / "run" / "nested").exists()
    for name in TOKENIZER_FILES:
        assert (tmp_path / "run" / name).read_bytes() == (cache / "tokenizer" / name).read_bytes()


def test_preprocess_records_trust_remote_code(clean_cache, tmp_path):
    assert json.loads((clean_cache / "manifest.json").read_text())["trust_remote_code"] is False
    trusted = make_cache(tmp_path, n=2, trust_remote_code=True)
    assert json.loads((trusted / "manifest.json").read_text())["trust_remote_code"] is True
