"""Non-finite losses, gradients and weights (issue 29, item 9): with --skip-nonfinite a skipped
step moves no weight (no weight decay, no Adam moment), is logged as skipped rather than as a
loss of 0, and `mtdpo plot` leaves it out; weights that are no longer finite stop the run before
anything is saved, so no model with a NaN tensor ever comes out of a run that exits 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_preprocess, write_jsonl
from safetensors.torch import load_file
from trainkit import logged, short_run, with_reference
from transformers import TrainerCallback

from mtdpo.errors import NonFiniteLoss, NonFiniteWeights, UsageError
from mtdpo.plot import read_metrics
from mtdpo.synthetic import make_pairs
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.run import train


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """8 pairs: 4 steps of 2 per epoch."""
    tmp = tmp_path_factory.mktemp("tiny")
    run_preprocess(write_jsonl(tmp / "rows.jsonl", list(make_pairs(8, seed=3))), tmp / "cache")
    return tmp / "cache"


def config(cache: Path, output_dir: Path, **overrides) -> MtdpoConfig:
    return short_run(cache, output_dir, **{"train_sampling_strategy": "sequential", **overrides})


def saved_tensors_finite(run: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(run / "model.safetensors")).values())


def test_a_huge_learning_rate_with_skip_never_saves_a_nan_model(tiny_cache, tmp_path):
    """The issue's reproduction: at --learning-rate 1e6 the second step's gradient overflows (its
    loss is finite). main applied it, every later loss was NaN and the saved model was all NaN,
    its metrics logging loss 0.0 for the skipped steps."""
    run = tmp_path / "run"
    train(config(tiny_cache, run, learning_rate=1e6, warmup_steps=0, max_steps=8, skip_nonfinite=True))
    assert saved_tensors_finite(run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "train_runtime" not in line]
    skipped = [line["step"] for line in steps if "skipped" in line]
    assert skipped and all("loss" not in line for line in steps if "skipped" in line)  # no loss 0.0
    assert all(math.isfinite(line["loss"]) and line["loss"] > 0 for line in steps if "loss" in line)
    assert [e["step"] for e in read_metrics(run)[0]] == [
        s["step"] for s in steps if "loss" in s
    ]  # plot leaves them out
    assert lines[-1]["nonfinite_skipped"] == len(skipped)


class Snapshots(TrainerCallback):
    """The trainable weights before and after each step, and the optimizer's step counts."""

    def __init__(self):
        self.before, self.after, self.adam_steps = {}, {}, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before[state.global_step + 1] = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.after[state.global_step] = [p.detach().clone() for p in model.parameters()]
        states = [optimizer.state[p] for p in model.parameters() if p in optimizer.state]
        self.adam_steps[state.global_step] = {int(s["step"]) for s in states}


def test_a_skipped_step_moves_no_weight_not_even_by_weight_decay_or_momentum(tiny_cache, tmp_path):
    cache = with_reference(tiny_cache, tmp_path / "cache", bad_row=5, value=math.nan)
    snapshots = Snapshots()
    trainer = train(config(cache, tmp_path / "run", skip_nonfinite=True, weight_decay=0.1), callbacks=[snapshots])
    skipped = sorted(logged(tmp_path / "run", "skipped"))
    assert trainer.nonfinite.skipped == len(skipped) == 1 and skipped[0] > 1  # a step after Adam has moments
    step = skipped[0]
    assert all(torch.equal(b, a) for b, a in zip(snapshots.before[step], snapshots.after[step]))
    assert snapshots.adam_steps[step] == {step - 1} and snapshots.adam_steps[4] == {3}  # the optimizer never saw it
    assert all(not torch.equal(b, a) for b, a in zip(snapshots.before[1], snapshots.after[1]))  # kept steps do move


def test_the_logged_loss_of_several_steps_is_the_mean_of_the_kept_ones(tiny_cache, tmp_path):
    cache = with_reference(tiny_cache, tmp_path / "cache", bad_row=5, value=math.nan)
    train(config(cache, tmp_path / "each", skip_nonfinite=True))
    train(config(cache, tmp_path / "all", skip_nonfinite=True, logging_steps=4))
    kept = logged(tmp_path / "each")
    assert len(kept) == 3
    assert logged(tmp_path / "all")[4] == pytest.approx(sum(kept.values()) / 3, rel=1e-5)
    summary = json.loads((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["train_loss"] == pytest.approx(sum(kept.values()) / 3, rel=1e-5)


def test_a_non_finite_gradient_stops_the_run_without_skip(tiny_cache, tmp_path):
    with pytest.raises(NonFiniteLoss) as err:
        train(config(tiny_cache, tmp_path / "run", learning_rate=1e6, warmup_steps=0, max_steps=8))
    assert str(err.value).startswith("the gradient is not finite at step 2 (source rows ")
    assert str(err.value).endswith("or pass --skip-nonfinite to skip such steps")
    assert sorted(logged(tmp_path / "run")) == [1] and not (tmp_path / "run" / "model.safetensors").exists()


class PoisonWeights(TrainerCallback):
    """What an optimizer step mtdpo cannot skip (DeepSpeed's own) could leave: a NaN weight."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == 2:
            with torch.no_grad():
                next(model.parameters())[0, 0] = math.nan


def test_weights_that_become_non_finite_stop_the_run_before_anything_is_saved(tiny_cache, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteWeights) as err:
        train(config(tiny_cache, run, save_strategy="steps", save_steps=1), callbacks=[PoisonWeights()])
    assert isinstance(err.value, UsageError)  # one line, exit 2
    assert str(err.value).startswith("the weights are not finite after step 2 (model.embed_tokens.weight")
    assert (run / "checkpoint-1").is_dir() and not (run / "checkpoint-2").exists()
    assert not (run / "model.safetensors").exists()
