"""LoRA on 2 CPU ranks (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 (with activation checkpointing),
and a resumed DDP run. The 2-rank losses equal 1 rank with twice the batch, the adapters the
run saves load with AutoPeftModelForCausalLM and, merged (ZeRO-3 run), with AutoModelForCausalLM,
giving the 1-rank log-probs. Every run starts from one saved model (ZeRO-3 builds a random one
shard by shard). Slow (a minute or more per launch on a busy 2-core machine): `make test-slow`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainkit import REPO, batch, free_port, logged, make_cache, saved_start_model
from transformers import AutoModelForCausalLM

from mtdpo.train.config import MtdpoConfig
from mtdpo.train.loss import sequence_logps
from mtdpo.train.run import train

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
LORA = ["--lora-r", "4", "--lora-alpha", "8"]
COMMON = [
    "--use-cpu",
    "--bf16",
    "false",
    "--logging-steps",
    "1",
    "--report-to",
    "none",
    "--learning-rate",
    "5e-3",
    "--train-sampling-strategy",
    "sequential",
    *LORA,
]


def logps(model, cache) -> torch.Tensor:
    mb = batch(cache, range(4))
    with torch.no_grad():
        return sequence_logps(
            model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits, mb["labels"]
        )[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 16-pair cache, a saved starting model, and the 1-rank LoRA run with batch 4 (4 steps)."""
    tmp = tmp_path_factory.mktemp("lora-dist")
    cache = make_cache(tmp, n=16)
    init = saved_start_model(tmp / "init")
    train(
        MtdpoConfig(
            data=[str(cache)],
            model=str(init),
            output_dir=str(tmp / "single"),
            use_cpu=True,
            max_steps=4,
            logging_steps=1,
            per_device_train_batch_size=4,
            train_sampling_strategy="sequential",
            save_strategy="no",
            report_to="none",
            learning_rate=5e-3,
            lora_r=4,
            lora_alpha=8,
            bf16=False,
        )
    )
    return tmp, cache, init


def launch(launcher: list[str], cache: Path, init: Path, out: Path, *extra: str) -> None:
    command = [
        *launcher,
        "-m",
        "mtdpo",
        "train",
        "--data",
        str(cache),
        "--model",
        str(init),
        "--output-dir",
        str(out),
        "--per-device-train-batch-size",
        "2",
        "--max-steps",
        "4",
        *COMMON,
        *extra,
    ]
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:  # a file, not a pipe: no rank blocks on a full pipe while the other waits
        result = subprocess.run(command, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    assert result.returncode == 0, log.read_text()[-4000:]


def accelerate(config: str) -> list[str]:
    return [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / f"configs/accelerate/{config}.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]


@pytest.mark.parametrize("system", ["ddp", "zero2", "zero3"])
def test_lora_on_two_ranks_equals_one_rank_with_twice_the_batch(setup, system):
    from peft import AutoPeftModelForCausalLM

    tmp, cache, init = setup
    out = tmp / system
    launcher = torchrun() if system == "ddp" else accelerate(system)
    extra = [
        "--save-strategy",
        "no",
        *(["--activation-checkpointing", "true", "--merge-adapters", "true"] if system == "zero3" else []),
    ]
    launch(launcher, cache, init, out, *extra)
    single = logged(tmp / "single")
    assert sorted(logged(out)) == [1, 2, 3, 4]
    assert logged(out) == pytest.approx(single, abs=1e-5)
    assert len({round(v, 4) for v in single.values()}) == 4

    expected = logps(AutoPeftModelForCausalLM.from_pretrained(tmp / "single"), cache)
    adapter_dir = out / "adapter" if system == "zero3" else out
    torch.testing.assert_close(
        logps(AutoPeftModelForCausalLM.from_pretrained(adapter_dir), cache), expected, rtol=1e-5, atol=1e-4
    )
    if system == "zero3":
        torch.testing.assert_close(
            logps(AutoModelForCausalLM.from_pretrained(out), cache), expected, rtol=1e-5, atol=1e-4
        )
    assert (logps(AutoModelForCausalLM.from_pretrained(init), cache) - expected).abs().max() > 1e-3  # training moved it


def test_lora_ddp_resume_gives_the_same_losses(setup):
    tmp, cache, init = setup
    straight, resumed = tmp / "resume-straight", tmp / "resume-resumed"
    launch(torchrun(), cache, init, straight, "--save-strategy", "steps", "--save-steps", "2")
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")  # what a run stopped after step 2 leaves
    launch(torchrun(), cache, init, resumed, "--save-strategy", "no", "--resume-from-checkpoint", "auto")
    before, after = logged(straight), logged(resumed)
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], abs=1e-6)
