"""What a run leaves to the libraries under it: DDP is told whether any parameter can go unused
(it searched, and warned, on every run), and library prints during device setup (DeepSpeed's)
go to stderr, leaving stdout to mtdpo's lines."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
from trainkit import batch, make_cache, mtdpo_trainer, tiny_model

from mtdpo.train.config import MtdpoConfig, library_output_to_stderr
from mtdpo.train.lora import add_lora
from mtdpo.train.model import has_unused_parameters
from mtdpo.train.run import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("run-output"), n=8)


@pytest.mark.parametrize("lora", [False, True])
def test_every_trainable_parameter_gets_a_gradient_so_ddp_need_not_search(cache, tmp_path, lora):
    policy = tiny_model()
    if lora:
        policy = add_lora(policy, 4, 8, 0.0, "all-linear")
    trainer = mtdpo_trainer(cache, policy, tiny_model(), tmp_path)
    loss, _ = trainer.batch_loss(trainer.model, batch(cache, range(4)))
    loss.backward()
    trained = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and [name for name, p in trained.items() if p.grad is None] == []
    assert has_unused_parameters(policy) is False


def test_a_multimodal_checkpoint_keeps_the_search():
    assert has_unused_parameters(SimpleNamespace(config=SimpleNamespace(vision_config={"hidden_size": 8})))


def test_train_tells_ddp_there_are_no_unused_parameters(cache, tmp_path):
    config = MtdpoConfig(
        data=[str(cache)], output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, max_steps=1, report_to="none"
    )
    assert config.ddp_find_unused_parameters is None  # transformers would pass True for this model
    trainer = train(config)
    assert trainer.args.ddp_find_unused_parameters is False
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False
    explicit = MtdpoConfig(
        data=[str(cache)],
        output_dir=str(tmp_path / "run2"),
        use_cpu=True,
        bf16=False,
        max_steps=1,
        report_to="none",
        ddp_find_unused_parameters=True,
    )
    assert train(explicit).accelerator.ddp_handler.find_unused_parameters is True  # the user's choice stands


def test_library_prints_during_device_setup_go_to_stderr(monkeypatch, capsys):
    deepspeed_logger = logging.getLogger("DeepSpeed")
    handler = logging.StreamHandler(sys.stdout)  # as deepspeed.utils.logging sets it up
    monkeypatch.setattr(deepspeed_logger, "handlers", [handler])
    monkeypatch.setitem(sys.modules, "deepspeed", SimpleNamespace())
    with library_output_to_stderr():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    deepspeed_logger.warning("Setting accelerator to CPU.")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
        "Setting accelerator to CPU.",
    ]
