"""LoRA through peft: only the adapters train, the reference is the policy with its adapters
off (no second model), the result loads with AutoPeftModelForCausalLM or, merged, with
AutoModelForCausalLM, and the checks say what is wrong in one line."""

import math
import shutil

import pytest
import torch
from trainkit import batch, logged, make_cache, precompute, short_run, tiny_model
from transformers import AutoModelForCausalLM

from mtdpo.errors import UsageError
from mtdpo.train import run as run_module
from mtdpo.train.forward import fused_sequence_logps
from mtdpo.train.loss import sequence_logps
from mtdpo.train.plan import Reference
from mtdpo.train.run import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("lora"), n=16)


def config(cache, out, **overrides):
    # fp32 (bf16 is the default on CPUs with AMX): the tests compare numbers
    lora = dict(learning_rate=5e-3, lora_r=4, lora_alpha=8, seed=5)
    return short_run(cache, out, **{**lora, **overrides})


def sequence_logps_plain(model, mb):
    """Summed log-probs of the trained tokens, from the full logits (any model, no fused head)."""
    return sequence_logps(model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits, mb["labels"])[0]


@pytest.fixture(scope="module")
def lora_run(cache, tmp_path_factory):
    """4 LoRA steps on the tiny default model, no reference model allowed, adapters merged too."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    original = run_module.load_reference
    run_module.load_reference = lambda *a, **k: pytest.fail("LoRA must not load a reference model")
    try:
        trainer = train(config(cache, out, merge_adapters=True))
    finally:
        run_module.load_reference = original
    return trainer, out


def test_only_the_adapters_train_and_the_reference_is_the_base(lora_run, cache):
    trainer, out = lora_run
    model = trainer.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    linear = {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }  # all-linear: attention and MLP
    assert {n.split(".")[-4] for n in trainable} == linear
    assert trainer.ref_model is None
    base = AutoModelForCausalLM.from_pretrained(out / "base-model")  # the seeded start, saved with the run
    mb = batch(cache, range(4))
    with torch.no_grad(), trainer.reference_model(model, Reference.ADAPTERS_OFF) as reference:
        adapters_off = fused_sequence_logps(reference, mb)[0]
    adapters_on = fused_sequence_logps(model, mb)[0].detach()
    torch.testing.assert_close(adapters_off, sequence_logps_plain(base, mb), rtol=1e-6, atol=1e-4)
    assert (adapters_on - adapters_off).abs().max() > 1e-3  # the adapters moved the policy; the reference stayed


def test_first_step_policy_equals_reference(lora_run):
    """LoRA starts with B = 0: at step 1 the policy is the reference, so DPO is exactly log 2."""
    _, out = lora_run
    assert logged(out, "dpo_loss")[1] == pytest.approx(math.log(2), abs=1e-6)
    assert logged(out, "rewards/margins")[1] == 0.0
    assert logged(out, "rewards/margins")[4] != 0.0


def test_adapters_load_with_peft_and_merged_with_transformers(lora_run, cache):
    from peft import AutoPeftModelForCausalLM

    trainer, out = lora_run
    mb = batch(cache, range(4))
    trained = fused_sequence_logps(trainer.model, mb)[0].detach()
    assert (out / "adapter" / "adapter_model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()
    adapters = AutoPeftModelForCausalLM.from_pretrained(out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(sequence_logps_plain(adapters, mb), trained, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(sequence_logps_plain(merged, mb), trained, rtol=1e-6, atol=1e-4)


def test_without_merge_the_output_dir_is_the_adapter(cache, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    out = tmp_path / "run"
    train(config(cache, out, max_steps=1, lora_target_modules="q_proj,v_proj"))
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert isinstance(model, PeftModel)
    assert {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n} == {"q_proj", "v_proj"}


def test_precomputed_reference_with_lora_gives_the_same_losses(cache, tmp_path):
    live = tmp_path / "live"
    train(config(cache, live, seed=42))
    cached = tmp_path / "cached"
    shutil.copytree(cache, cached)
    precompute(cached)  # the seed-42 tiny model: the LoRA run's base
    pre = tmp_path / "pre"
    train(config(cached, pre, seed=42))
    for step, loss in logged(live, "loss").items():
        assert logged(pre, "loss")[step] == pytest.approx(loss, abs=1e-5)


def test_resume_with_lora_gives_the_same_losses(cache, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(
        config(cache, straight, max_steps=4, save_strategy="steps", save_steps=2, train_sampling_strategy="sequential")
    )
    assert (straight / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train(config(cache, resumed, max_steps=4, resume_from_checkpoint="auto", train_sampling_strategy="sequential"))
    before, after = logged(straight, "loss"), logged(resumed, "loss")
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], abs=1e-6)


def test_gradient_checkpointing_gives_the_same_lora_losses(cache, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "gc"
    train(config(cache, plain, max_steps=2))
    trainer = train(config(cache, checkpointed, max_steps=2, activation_checkpointing=True))
    assert trainer.model.get_base_model().is_activation_checkpointing
    assert logged(checkpointed, "loss") == pytest.approx(logged(plain, "loss"), abs=1e-6)
    assert logged(plain, "loss")[2] != logged(plain, "loss")[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lora_r=-1), "--lora-r -1"),
        (dict(lora_r=0, merge_adapters=True), "--merge-adapters needs LoRA"),
        (dict(lora_target_modules="qproj"), "--lora-target-modules qproj"),
        (dict(load_in_4bit=True, model=None), "--load-in-4bit"),
    ],
)
def test_bad_lora_options_are_one_line_errors(cache, tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message) as err:
        train(config(cache, tmp_path / "run", **overrides))
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_qlora_on_cpu_says_it_needs_a_gpu(cache, tmp_path):
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    with pytest.raises(UsageError, match="CUDA GPU only"):
        train(config(cache, tmp_path / "run", model=str(base), load_in_4bit=True, allow_mismatch=True))
