"""Sides of several sequences (turns scored in their own generation contexts) through stage two:
every layout gives the log-prob sum of the sequences one by one, and precompute-ref, training and
resume take them like any pair."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import family_tokenizer, invoke, msg, write_jsonl
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from mtdpo.assets import TINY_MODEL
from mtdpo.cache import open_cache
from mtdpo.train.attention import SEGMENT_ATTENTION
from mtdpo.train.data import PairCollator
from mtdpo.train.forward import fused_sequence_logps
from mtdpo.train.loss import sequence_logps


def follow_up_rows(n: int) -> list[dict]:
    """Qwen3 rows with reasoning and a follow-up question, the sides differing from the first
    answer: Qwen3 drops an answered turn's <think> block from the history, so each side's first
    turn is scored in its own context."""

    def side(k: int, answer: int, thought: str) -> list[dict]:
        first = {"role": "assistant", "content": f"It is {answer}.", "reasoning_content": thought}
        second = {"role": "assistant", "content": f"{2 * answer}.", "reasoning_content": "Double it."}
        return [msg("user", f"What is {k} + {k}?"), first, msg("user", "And times two?"), second]

    return [
        {"chosen": side(k, 2 * k, f"{k} and {k} make {2 * k}."), "rejected": side(k, 2 * k + 1, "Guess.")}
        for k in range(n)
    ]


@pytest.fixture(scope="module")
def qwen3_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contexts")
    tok = family_tokenizer("qwen3")
    tok.save_pretrained(tmp / "tokenizer")
    result = invoke(
        "preprocess",
        write_jsonl(tmp / "rows.jsonl", follow_up_rows(6)),
        "--tokenizer",
        tmp / "tokenizer",
        "--out",
        tmp / "cache",
        "-q",
    )
    assert result.exit_code == 0, result.output
    return tmp / "cache", len(tok)


def model_for(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(str(TINY_MODEL))
    config.vocab_size = vocab
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)


def test_each_side_is_two_sequences_in_the_cache(qwen3_cache):
    cache, _ = qwen3_cache
    opened = open_cache(cache)
    assert len(opened.starts) == 6  # every pair has a side of several sequences
    record = opened.record(0)
    assert len(record.chosen.starts) == 2 and len(record.rejected.starts) == 2
    first, second = record.chosen.pieces()
    assert first.trained_tokens > 0 and second.trained_tokens > 0
    assert record.prompt_len <= min(len(first), len(record.rejected.pieces()[0]))


@pytest.mark.parametrize(
    "options", [{"segments": True}, {"padding_free": True}, {"prefix_sharing": True}, {"prefix_forest": True}]
)
def test_every_layout_sums_the_sequences_of_a_side(qwen3_cache, options):
    cache, vocab = qwen3_cache
    opened = open_cache(cache)
    records = [opened.record(i) for i in range(3)]
    model = model_for(vocab)
    expected = []
    for side in ("chosen", "rejected"):
        for record in records:
            total = 0.0
            for piece in record.side(side).pieces():
                logits = model(input_ids=torch.tensor([piece.input_ids])).logits
                total += sequence_logps(logits, torch.tensor([piece.labels]))[0].item()
            expected.append(total)
    model.set_attn_implementation(SEGMENT_ATTENTION)
    add_fused_lm_head(model)
    with torch.no_grad():
        logps, tokens = fused_sequence_logps(model, PairCollator(0, **options)(records))
    assert logps.tolist() == pytest.approx(expected, abs=1e-4)
    trained = [record.side(side).trained_tokens for side in ("chosen", "rejected") for record in records]
    assert tokens.tolist() == trained


def test_show_sample_json_lists_each_sequence(qwen3_cache):
    import json

    cache, _ = qwen3_cache
    result = invoke("show-sample", cache, "--json", "--all")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and len(lines) == 6
    record = open_cache(cache).record(0)
    assert lines[0]["chosen"]["sequences"] == [
        {"input_ids": piece.input_ids, "labels": piece.labels} for piece in record.chosen.pieces()
    ]
    text = invoke("show-sample", cache).stdout
    assert "sequence 1 of 2" in text and "sequence 2 of 2" in text


def test_training_and_a_precomputed_reference_take_sides_of_several_sequences(qwen3_cache, tmp_path):
    """A live reference and the precomputed one give the same first loss (fp32)."""
    cache, vocab = qwen3_cache
    model_dir = tmp_path / "model"
    model_for(vocab).save_pretrained(model_dir)
    shutil.copytree(cache / "tokenizer", model_dir, dirs_exist_ok=True)
    common = ["--model", model_dir, "--no-bf16", "--use-cpu", "--max-steps", "2", "--per-device-train-batch-size", "2"]
    common += ["--logging-steps", "1", "--save-strategy", "no", "--report-to", "none"]
    live = invoke("train", "--data", cache, "--output-dir", tmp_path / "live", *common)
    assert live.exit_code == 0, live.output
    pre_cache = shutil.copytree(cache, tmp_path / "pre-cache")
    stored = invoke("precompute-ref", pre_cache, "--model", model_dir, "--no-bf16", "--use-cpu")
    assert stored.exit_code == 0, stored.output
    pre = invoke("train", "--data", pre_cache, "--output-dir", tmp_path / "pre", *common)
    assert pre.exit_code == 0, pre.output
    from trainkit import logged

    assert logged(tmp_path / "pre") == pytest.approx(logged(tmp_path / "live"), abs=1e-5)
