"""Parity of mtdpo's KTO trainer with TRL 1.16's KTOTrainer on single-turn rows, and the mask's
guarantee on multi-turn rows.

Single-turn: the same tiny model (fp32 on both sides), the same rows (TRL's conversational
unpaired shape, preprocessed by mtdpo; rendered to text for TRL, tests/train/kto_reference.py),
the same per-device batch of 4, TRL's sequential order and mtdpo's `--train-sampling-strategy
sequential`; each side computes its own reference log-probs with a frozen copy of the reference
model. The token ids agree (asserted), so the loss, the KL reference point, the per-row rewards,
what each logs and the gradient must agree to 1e-6. mtdpo's sequences end with the template's
untrained "\\n" after <end_of_turn>: last, so it changes no earlier logit.

Multi-turn: logits at label -100 positions (user turns, tool output, headers, prompt) never
reach the loss: perturbing them leaves it bit-identical.
"""

import copy
import math

import pytest
import torch
from kto_reference import PARAMETER, as_trl_text, single_turn_kto_rows, trl_kto_step
from trainkit import kto_batch, kto_trainer, make_cache, tiny_model

from mtdpo.train.forward import fused_sequence_logps
from mtdpo.train.plan import Reference

pytest.importorskip("trl")
B = 4
TOLERANCE = 1e-6


def models():
    """A policy, and a reference moved away from it, noisier: its near-uniform distributions
    spread, so it gives the completions lower log-probs and the KL mean is > 0 (not clamped)."""
    policy = tiny_model(seed=0)
    reference = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy, reference


@pytest.fixture(scope="module")
def kto_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kto-parity")
    return tmp, single_turn_kto_rows(8), make_cache(tmp, single_turn_kto_rows(8), name="kto")


def mtdpo_step(cache, policy, reference, tmp, **config):
    trainer = kto_trainer(cache, copy.deepcopy(policy), reference, tmp, per_device_train_batch_size=B, **config)
    trainer.model.train()
    inputs = kto_batch(trainer, range(B))  # the sequential sampler's first batch
    loss, metrics = trainer.batch_loss(trainer.model, inputs)
    loss.backward()
    return trainer, inputs, loss.item(), metrics, trainer.model.get_parameter(PARAMETER).grad


@pytest.mark.parametrize(
    "config",
    [
        dict(loss_type="kto"),
        dict(loss_type="kto", desirable_weight=1.3, undesirable_weight=0.7, beta=0.3),
        dict(loss_type="apo_zero_unpaired"),
    ],
    ids=["kto", "kto-weighted", "apo_zero_unpaired"],
)
def test_loss_kl_rewards_and_gradient_equal_trl(kto_cache, tmp_path, config):
    tmp, rows, cache = kto_cache
    policy, reference = models()
    theirs = trl_kto_step(as_trl_text(rows), policy, reference, tmp_path / "trl", batch_size=B, **config)
    trainer, inputs, loss, metrics, grad = mtdpo_step(cache, policy, reference, tmp_path, **config)

    # the same tokens: TRL's prompt + completion (and KL completion) are mtdpo's sequences less the trailing "\n"
    for k, example in enumerate(theirs.examples):
        ours = inputs["policy"]["input_ids"][k][inputs["policy"]["attention_mask"][k].bool()].tolist()
        assert ours[:-1] == example["prompt_ids"] + example["completion_ids"]
        if config["loss_type"] == "kto":
            kl = inputs["kl"]["input_ids"][k][inputs["kl"]["attention_mask"][k].bool()].tolist()
            assert kl[:-1] == example["prompt_ids"] + example["KL_completion_ids"]
    assert inputs["desirable"].tolist() == theirs.desirable.tolist() == [True, False, True, False]

    assert abs(loss - theirs.loss) < TOLERANCE
    assert abs(metrics["kl"] - theirs.kl) < TOLERANCE
    if config["loss_type"] == "kto":
        assert theirs.kl > 0  # the clamp does not hide the comparison
    rewards = trainer.args.beta * (
        fused_sequence_logps(trainer.model, inputs["policy"])[0] - ref_logps(trainer, inputs)
    )
    assert torch.allclose(rewards.detach(), theirs.rewards, atol=TOLERANCE, rtol=0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        assert abs(metrics[key] - theirs.metrics[key]) < TOLERANCE, key
    assert grad.abs().sum() > 0 and torch.allclose(grad, theirs.grad, atol=TOLERANCE, rtol=0)
    assert math.isfinite(loss)


def ref_logps(trainer, inputs):
    with torch.no_grad():
        return fused_sequence_logps(trainer.ref_model, inputs["policy"])[0]


def test_precomputed_reference_columns_give_trl_s_numbers(kto_cache, tmp_path):
    """precompute-ref's ref_logp / ref_kl_logp (batch size 4 recorded) stand in for the model."""
    import shutil

    from trainkit import precompute

    tmp, rows, cache = kto_cache
    policy, reference = models()
    copy_dir = tmp_path / "kto-ref"
    shutil.copytree(cache, copy_dir)
    reference.save_pretrained(tmp_path / "reference")
    from mtdpo.assets import EMBEDDED_TOKENIZER

    shutil.copytree(EMBEDDED_TOKENIZER, tmp_path / "reference", dirs_exist_ok=True)
    precompute(
        copy_dir,
        model=str(tmp_path / "reference"),
        per_device_train_batch_size=B,
        per_device_eval_batch_size=B,
        attn_implementation="eager",
    )
    theirs = trl_kto_step(as_trl_text(rows), policy, reference, tmp_path / "trl", batch_size=B)
    trainer, inputs, loss, metrics, grad = mtdpo_step(
        copy_dir, policy, None, tmp_path, ref_model=str(tmp_path / "reference")
    )
    assert trainer.plan.reference is Reference.COLUMNS and "ref_kl_logps" in inputs
    assert abs(loss - theirs.loss) < TOLERANCE and abs(metrics["kl"] - theirs.kl) < TOLERANCE
    assert torch.allclose(grad, theirs.grad, atol=TOLERANCE, rtol=0)
