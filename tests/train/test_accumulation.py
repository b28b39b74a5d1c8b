"""Batch x accumulation x ranks never changes the update (`--loss-scope step`, the default).

The DPO term is the mean over the optimizer step's pairs and the NLL the mean over its trained
chosen tokens, every micro-batch and rank together. Before, the NLL was a mean per micro-batch:
batch 4 x 1 and batch 2 x 2 moved the tiny model's weights 4.6e-3 apart (largest update 0.48,
SGD lr 1); `--loss-scope micro_batch` keeps that behaviour (bench/measure_exactness.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cache_dataset
from test_train import logged, run_config
from trainkit import REPO, batch, make_cache, mtdpo_trainer, saved_start_model, tiny_model
from transformers import AutoModelForCausalLM

from mtdpo.train.data import PairCollator
from mtdpo.train.forward import fused_sequence_logps
from mtdpo.train.loss import nll_loss, sequence_nll_loss
from mtdpo.train.run import train

# fp32 (bf16 is the default on CPUs with bf16 matmul): updates are compared to 1e-6
SGD = dict(
    optim="sgd",
    learning_rate=1.0,
    lr_scheduler_type="constant",
    weight_decay=0.0,
    max_grad_norm=0.0,
    train_sampling_strategy="sequential",
    max_steps=1,
    bf16=False,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 16-pair cache and a saved starting model (so every run, in any process, starts alike)."""
    tmp = tmp_path_factory.mktemp("accumulation")
    cache = make_cache(tmp, n=16)
    init = saved_start_model(tmp / "init")
    return tmp, cache, init


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(str(run_dir)).state_dict()


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def one_sgd_step(setup, name: str, batch_size: int, accumulation: int, **options) -> Path:
    tmp, cache, init = setup
    out = tmp / name
    train(
        run_config(
            cache,
            tmp,
            output_dir=str(out),
            model=str(init),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            **SGD,
            **options,
        )
    )
    return out


def test_the_nll_shares_of_micro_batches_sum_to_the_whole_batch_nll():
    """Hand-worked: pairs with (summed log-prob, trained tokens) (-6, 2), (-3, 1), (-8, 4)."""
    logps, tokens = torch.tensor([-6.0, -3.0, -8.0]), torch.tensor([2, 1, 4])
    assert nll_loss(logps, tokens).item() == pytest.approx(17 / 7)
    parts = nll_loss(logps[:2], tokens[:2], 7) + nll_loss(logps[2:], tokens[2:], 7)  # micro-batches of 2 and 1
    assert parts.item() == pytest.approx(17 / 7)
    assert sequence_nll_loss(logps, tokens).item() == pytest.approx((3 + 3 + 2) / 3)
    parts = sequence_nll_loss(logps[:2], tokens[:2], 3) + sequence_nll_loss(logps[2:], tokens[2:], 3)
    assert parts.item() == pytest.approx(8 / 3)
    # The per-micro-batch mean (--loss-scope micro_batch) differs: ((6 + 3) / 3 + 8 / 4) / 2
    assert (nll_loss(logps[:2], tokens[:2]) + nll_loss(logps[2:], tokens[2:])).item() / 2 == pytest.approx(2.5)


def test_the_collator_counts_the_trained_chosen_tokens_of_every_layout(setup, tmp_path):
    _, cache, _ = setup
    rows = [cache_dataset(cache)[i] for i in range(5)]
    trainer = mtdpo_trainer(cache, tiny_model(), None, tmp_path)
    for padding_free in (False, True):
        mb = PairCollator(0, padding_free)(rows)
        with torch.no_grad():
            _, tokens = fused_sequence_logps(trainer.model, mb)
        assert int(mb["chosen_tokens"]) == int(tokens.chunk(2)[0].sum()) > 0
    assert int(batch(cache, [0])["chosen_tokens"]) == sum(label != -100 for label in rows[0]["chosen_labels"][1:])


@pytest.mark.parametrize("nll_norm", ["token", "sequence"])
def test_batch_4_equals_batch_2_with_accumulation_2(setup, nll_norm):
    whole = one_sgd_step(setup, f"whole-{nll_norm}", 4, 1, nll_norm=nll_norm)
    halves = one_sgd_step(setup, f"halves-{nll_norm}", 2, 2, nll_norm=nll_norm)
    start = weights(setup[2])
    assert largest_difference(weights(whole), start) > 0.1  # SGD lr 1: the step moved the weights
    assert largest_difference(weights(whole), weights(halves)) < 1e-6
    assert logged(halves)[1] == pytest.approx(logged(whole)[1], abs=1e-6)
    for key in ("dpo_loss", "nll"):
        assert logged(halves, key)[1] == pytest.approx(logged(whole, key)[1], abs=1e-6)


def test_an_uneven_last_micro_batch_weighs_by_its_pairs_and_tokens(setup, tmp_path):
    """6 pairs as micro-batches of 4 and 2 (batch 4 x accumulation 2) = one batch of 6."""
    _, full, init = setup
    six = make_cache(
        tmp_path, rows=[json.loads(line) for line in (full.parent / "cache.jsonl").read_text().splitlines()[:6]]
    )
    runs = {}
    for batch_size, accumulation in ((6, 1), (4, 2)):
        runs[batch_size] = tmp_path / f"b{batch_size}"
        train(
            run_config(
                six,
                tmp_path,
                output_dir=str(runs[batch_size]),
                model=str(init),
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                **SGD,
            )
        )
    assert largest_difference(weights(runs[6]), weights(runs[4])) < 1e-6


def test_micro_batch_scope_keeps_the_per_micro_batch_mean(setup):
    """The documented way back to the seed's behaviour: a different update, and the NLL logged
    (and trained) is the mean of each micro-batch's token mean."""
    tmp, cache, init = setup
    whole = one_sgd_step(setup, "whole-for-micro", 4, 1)
    old = one_sgd_step(setup, "halves-micro", 2, 2, loss_scope="micro_batch")
    assert largest_difference(weights(whole), weights(old)) > 1e-4
    trainer = mtdpo_trainer(cache, AutoModelForCausalLM.from_pretrained(str(init)), None, tmp)
    with torch.no_grad():
        means = [
            nll_loss(*(t.chunk(2)[0] for t in fused_sequence_logps(trainer.model, batch(cache, rows))))
            for rows in ([0, 1], [2, 3])
        ]
    assert logged(old, "nll")[1] == pytest.approx((means[0] + means[1]).item() / 2, rel=1e-5)
    assert logged(whole, "nll")[1] != pytest.approx(logged(old, "nll")[1], rel=1e-5)


@pytest.mark.slow
def test_two_ranks_of_batch_2_with_accumulation_2_equal_one_batch_of_8(setup):
    tmp, cache, init = setup
    whole = one_sgd_step(setup, "whole-8", 8, 1)
    out = tmp / "ddp-2x2"
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        "29541",
        "-m",
        "mtdpo",
        "train",
        "--data",
        str(cache),
        "--model",
        str(init),
        "--output-dir",
        str(out),
        "--use-cpu",
        "--per-device-train-batch-size",
        "2",
        "--gradient-accumulation-steps",
        "2",
        "--logging-steps",
        "1",
        "--save-strategy",
        "no",
        "--report-to",
        "none",
        *(f"--{key.replace('_', '-')}={value}" for key, value in SGD.items()),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert largest_difference(weights(whole), weights(init)) > 0.1
    assert largest_difference(weights(whole), weights(out)) < 1e-6
    assert logged(out)[1] == pytest.approx(logged(whole)[1], abs=1e-6)
