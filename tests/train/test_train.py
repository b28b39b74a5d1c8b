"""The trainer: multi-turn masking in the loss, no tokenizer at runtime, checks, resume, config."""

import json
import shutil

import pytest
import torch
import transformers
from helpers import edit_manifest
from trainkit import batch, logged, loss_metrics_grads, make_cache, mtdpo_trainer, precompute, short_run, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mtdpo.errors import UsageError
from mtdpo.train.forward import fused_sequence_logps
from mtdpo.train.loss import sequence_logps
from mtdpo.train.run import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("train"), n=24)


def test_loss_counts_exactly_the_trained_tokens(cache, tmp_path):
    """Changing the logits that predict user/tool/header tokens (label -100) moves nothing."""
    mb = batch(cache, range(4))
    trained = mb["labels"][:, 1:] != -100
    masked = ~trained & (mb["attention_mask"][:, 1:] == 1)
    assert masked.sum() > trained.sum() / 2  # multi-turn rows: many masked tokens in the sequences
    logits = torch.randn(*mb["input_ids"].shape, 2048, generator=torch.Generator().manual_seed(0))
    trainer = mtdpo_trainer(cache, tiny_model(), None, tmp_path)
    ref_logps = torch.full((8,), -300.0)

    def loss_and_metrics(lg):
        logps, tokens = sequence_logps(lg, mb["labels"])
        loss, metrics = trainer.objective(logps, ref_logps, tokens)
        return loss.item(), metrics

    base_loss, base = loss_and_metrics(logits)
    perturbed = logits.clone()
    perturbed[:, :-1][masked] += 10 * torch.randn(int(masked.sum()), 2048)
    assert loss_and_metrics(perturbed)[0] == base_loss
    bumped = logits.clone()
    first_trained = trained[0].nonzero()[0, 0]
    bumped[0, first_trained] += 5.0 * torch.randn(2048)
    assert loss_and_metrics(bumped)[0] != base_loss

    # NLL is the mean over the chosen trained tokens, counted from the labels
    chosen_labels = mb["labels"][:4, 1:]
    n_chosen = (chosen_labels != -100).sum().item()
    logp = torch.log_softmax(logits[:4, :-1], -1).gather(-1, chosen_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected_nll = -(logp * (chosen_labels != -100)).sum().item() / n_chosen
    assert base["nll"] == pytest.approx(expected_nll, rel=1e-5)


def test_trainer_log_probs_equal_the_definition(cache, tmp_path):
    """The fused head (no logits materialised) gives loss.sequence_logps of the full logits."""
    mb = batch(cache, range(4))
    model = tiny_model()
    with torch.no_grad():
        expected, counts = sequence_logps(
            model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits, mb["labels"]
        )
    trainer = mtdpo_trainer(cache, model, None, tmp_path)
    with torch.no_grad():
        fused, fused_counts = fused_sequence_logps(trainer.model, mb)
    assert torch.equal(fused_counts, counts) and counts.sum() == (mb["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-4)


def run_config(cache, tmp_path, **overrides):
    return short_run(cache, overrides.pop("output_dir", tmp_path / "run"), **{"disable_tqdm": True, **overrides})


def test_training_never_loads_a_tokenizer(cache, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("stage two must not load a tokenizer")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "from_pretrained", refuse)
    config = run_config(cache, tmp_path, eval_data=str(cache), eval_strategy="steps", eval_steps=2)
    train(config)
    monkeypatch.undo()

    run = tmp_path / "run"
    assert (run / "model.safetensors").exists()
    assert logged(run, "eval_rewards/margins")  # eval on the second cache logs DPO metrics too
    margins = logged(run, "rewards/margins")
    assert sorted(margins) == [1, 2, 3, 4]
    model = AutoModelForCausalLM.from_pretrained(str(run))
    tok = AutoTokenizer.from_pretrained(str(run))
    assert model.config.vocab_size == 2048 and len(tok) == 2048
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<bos><start_of_turn>user"
    )


def test_tokenizer_mismatch_is_refused_unless_allowed(cache, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    edit_manifest(other, lambda m: m["tokenizer"].update(fingerprint="0" * 64))
    with pytest.raises(UsageError, match="differs from the cache's"):
        train(run_config(other, tmp_path, max_steps=1))
    train(run_config(other, tmp_path, max_steps=1, allow_mismatch=True))


def test_vocabulary_too_small_is_refused(cache, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    edit_manifest(other, lambda m: m["tokenizer"].update(vocab_size=32000))
    with pytest.raises(UsageError, match="token ids up to 31999"):
        train(run_config(other, tmp_path, max_steps=1, allow_mismatch=True))


def test_resume_gives_the_same_losses(cache, tmp_path):
    straight = tmp_path / "straight"
    train(run_config(cache, tmp_path, output_dir=str(straight), max_steps=6, save_strategy="steps", save_steps=3))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")  # what a run stopped at step 3 leaves
    train(run_config(cache, tmp_path, output_dir=str(resumed), max_steps=6, resume_from_checkpoint="auto"))
    before, after = logged(straight), logged(resumed)
    assert sorted(after) == [4, 5, 6]
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(before[step], abs=1e-6)
    assert before[4] != before[6]


def test_same_seed_same_losses(cache, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(run_config(cache, tmp_path, output_dir=str(a)))
    train(run_config(cache, tmp_path, output_dir=str(b)))
    assert logged(a) == logged(b)


def test_yaml_config_then_command_line_overrides(tmp_path):
    from mtdpo.train.config import parse_train_args

    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "beta: 0.25\nnll_coef: 0.5\nlearning_rate: 4.0e-7\nlr_scheduler_type: cosine\ndata: [a, b]\n"
    )
    config = parse_train_args(
        ["--config", str(config_file), "--learning-rate", "1e-6", "--max-steps", "10", "--output-dir", str(tmp_path)]
    )
    assert (config.beta, config.nll_coef, config.learning_rate, config.max_steps) == (0.25, 0.5, 1e-6, 10)
    assert config.data == ["a", "b"] and config.lr_scheduler_type == "cosine"
    defaults = parse_train_args(["--data", "x", "--output-dir", str(tmp_path)])
    assert (defaults.beta, defaults.nll_coef, defaults.loss_type, defaults.train_sampling_strategy) == (
        0.1,
        1.0,
        "sigmoid",
        "group_by_length",
    )


def test_train_help_lists_every_option():
    import subprocess
    import sys
    from pathlib import Path

    mtdpo = Path(sys.executable).parent / "mtdpo"
    out = subprocess.run([str(mtdpo), "train", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in (
        "--data",
        "--model",
        "--ref-model",
        "--beta",
        "--nll-coef",
        "--loss-type",
        "--label-smoothing",
        "--eval-data",
        "--allow-mismatch",
        "--attn-implementation",
        "--learning-rate",
        "--max-steps",
        "--per-device-train-batch-size",
        "--resume-from-checkpoint",
        "--config",
    ):
        assert flag in out, flag


def test_precomputed_reference_gives_the_same_losses_without_a_reference_model(cache, tmp_path, monkeypatch):
    from helpers import cache_dataset

    from mtdpo.train import run as run_module

    live = tmp_path / "live"
    train(run_config(cache, tmp_path, output_dir=str(live)))
    cached = tmp_path / "cached"
    shutil.copytree(cache, cached)
    precompute(cached)
    assert {"ref_chosen_logp", "ref_rejected_logp"} <= set(cache_dataset(cached).column_names)
    assert json.loads((cached / "manifest.json").read_text())["reference"]["columns"] == [
        "ref_chosen_logp",
        "ref_rejected_logp",
    ]

    def no_reference(*args, **kwargs):
        raise AssertionError("a precomputed cache must not load a reference model")

    monkeypatch.setattr(run_module, "load_reference", no_reference)
    precomputed = tmp_path / "precomputed"
    train(run_config(cached, tmp_path, output_dir=str(precomputed)))
    for step, loss in logged(live).items():
        assert logged(precomputed)[step] == pytest.approx(loss, abs=1e-5)
    assert logged(precomputed, "rewards/margins")[4] != 0.0


def test_padding_free_batches_give_the_padded_losses_and_gradients(cache, tmp_path):
    from helpers import cache_dataset

    from mtdpo.train.data import PairCollator

    rows = [cache_dataset(cache)[i] for i in range(4)]
    padded, packed = PairCollator(0)(rows), PairCollator(0, padding_free=True)(rows)
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))  # not one pad token
    results = []
    for inputs in (padded, packed):
        trainer = mtdpo_trainer(cache, tiny_model(), tiny_model(), tmp_path, attn_implementation="sdpa")
        results.append(loss_metrics_grads(trainer, inputs))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    for name in ("nll", "logps/chosen", "logps/rejected"):
        assert metrics_b[name] == pytest.approx(metrics_a[name], rel=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b)) < 1e-4


def test_abbreviated_options_are_typos_not_prefixes(tmp_path):
    from mtdpo.train.config import parse_train_args

    with pytest.raises(ValueError, match="--learning_rat"):
        parse_train_args(["--data", "x", "--output-dir", str(tmp_path), "--learning_rat", "1"])
