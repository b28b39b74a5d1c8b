"""The preference losses and NLL normalisations inside the trainer: multi-turn masking per loss
type on a real cache batch, SimPO without any reference, and the one-line refusals."""

import json

import pytest
import torch
from trainkit import batch, make_cache, mtdpo_trainer, short_run, tiny_model

from mtdpo.errors import UsageError
from mtdpo.train import run as run_module
from mtdpo.train import trainer as trainer_module
from mtdpo.train.loss import LOSS_TYPES, NLL_NORMS, sequence_logps
from mtdpo.train.run import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("losses"), n=16)


@pytest.fixture(scope="module")
def logits_batch(cache):
    mb = batch(cache, range(4))
    logits = torch.randn(*mb["input_ids"].shape, 2048, generator=torch.Generator().manual_seed(0))
    return mb, logits


@pytest.mark.parametrize("nll_norm", NLL_NORMS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_multi_turn_masking_holds_for_every_loss(cache, logits_batch, tmp_path, loss_type, nll_norm):
    """Perturbing the logits that predict user / tool / header tokens (label -100) leaves the
    trainer's loss bit-identical; perturbing one trained position moves it."""
    mb, logits = logits_batch
    trained = mb["labels"][:, 1:] != -100
    masked = ~trained & (mb["attention_mask"][:, 1:] == 1)
    assert masked.sum() > trained.sum() / 2  # multi-turn rows: many masked tokens inside the sequences
    trainer = mtdpo_trainer(
        cache,
        tiny_model(),
        None,
        tmp_path,
        loss_type=loss_type,
        nll_norm=nll_norm,
        label_smoothing=0.1 if loss_type == "robust" else 0.0,
    )
    # a reference close to the policy, so that no loss is saturated and a trained position matters
    ref_logps = sequence_logps(logits, mb["labels"])[0] + torch.randn(8, generator=torch.Generator().manual_seed(1))

    def loss_of(lg):
        logps, tokens = sequence_logps(lg, mb["labels"])
        return trainer.objective(logps, ref_logps, tokens)[0]

    base = loss_of(logits)
    perturbed = logits.clone()
    perturbed[:, :-1][masked] += 10 * torch.randn(int(masked.sum()), 2048)
    perturbed[:, -1] -= 7.0  # the last position predicts nothing
    assert torch.equal(loss_of(perturbed), base)
    bumped = logits.clone()
    bumped[4, trained[4].nonzero()[0, 0]] += 5.0 * torch.randn(2048)  # a rejected sequence's trained position
    assert loss_of(bumped) != base


def test_sequence_nll_weighs_each_conversation_alike(cache, logits_batch, tmp_path):
    mb, logits = logits_batch
    logps, tokens = sequence_logps(logits, mb["labels"])
    per_sequence = (-logps[:4] / tokens[:4]).mean().item()
    per_token = (-logps[:4].sum() / tokens[:4].sum()).item()
    assert tokens[:4].unique().numel() > 1 and per_sequence != pytest.approx(per_token, rel=1e-3)  # the two differ here
    for norm, expected in (("token", per_token), ("sequence", per_sequence)):
        trainer = mtdpo_trainer(cache, tiny_model(), None, tmp_path, nll_norm=norm)
        assert trainer.objective(logps, torch.full((8,), -300.0), tokens)[1]["nll"] == pytest.approx(expected, rel=1e-6)


def config(cache, tmp_path, **overrides):
    return short_run(cache, tmp_path / "run", **{"max_steps": 3, "bf16": None, **overrides})


def test_simpo_loads_no_reference_and_runs_one_forward_per_step(cache, tmp_path, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("SimPO is reference-free: no reference model may be loaded")

    forwards = []
    counted = trainer_module.fused_sequence_logps

    def counting(model, inputs):
        forwards.append(model)
        return counted(model, inputs)

    monkeypatch.setattr(run_module, "load_reference", no_reference)
    monkeypatch.setattr(trainer_module, "fused_sequence_logps", counting)
    trainer = train(config(cache, tmp_path, loss_type="simpo", beta=2.0, simpo_gamma=0.5))
    assert trainer.ref_model is None
    assert len(forwards) == 3 and all(m is forwards[0] for m in forwards)  # the policy, once per step, nothing else
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [line["rewards/chosen"] for line in lines if "rewards/chosen" in line]
    assert len(rewards) == 3 and all(r < 0 for r in rewards)  # beta * mean token log-prob: negative, not zero


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(loss_type="simpo", ref_model="some/model"), "reference-free"),
        (dict(nll_norm="pair"), "unknown --nll-norm 'pair'"),
        (dict(loss_type="dpo_norm"), "unknown --loss-type 'dpo_norm'"),
    ],
)
def test_bad_loss_options_are_one_line_errors(cache, tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message):
        train(config(cache, tmp_path, **overrides))
