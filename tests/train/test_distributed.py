"""Several CPU ranks (gloo): DDP via torchrun and DeepSpeed ZeRO-2 via accelerate launch.

The 2-rank step-0 loss with per-device batch b must equal the 1-rank loss with batch 2b:
DPO is a mean over pairs and the NLL is divided by the chosen tokens of all ranks.
Slow (ZeRO-2 compiles a comm op on first use, ~1 min): `make test-slow`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainkit import REPO, make_cache

from mtdpo.train.config import MtdpoConfig
from mtdpo.train.run import train

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
COMMON = [
    "--use-cpu",
    "--bf16",
    "false",
    "--max-steps",
    "2",
    "--logging-steps",
    "1",
    "--train-sampling-strategy",
    "sequential",
    "--save-strategy",
    "no",
    "--disable-tqdm",
    "true",
    "--report-to",
    "none",
]


def first_loss(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(line["loss"] for line in lines if line["step"] == 1 and "loss" in line)


@pytest.fixture(scope="module")
def cache_and_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    cache = make_cache(tmp, n=16)
    single = tmp / "single"
    train(
        MtdpoConfig(
            data=[str(cache)],
            output_dir=str(single),
            use_cpu=True,
            max_steps=2,
            logging_steps=1,
            per_device_train_batch_size=4,
            train_sampling_strategy="sequential",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            bf16=False,
        )
    )
    return tmp, cache, first_loss(single)


def launch(launcher: list[str], cache: Path, out: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        *launcher,
        "-m",
        "mtdpo",
        "train",
        "--data",
        str(cache),
        "--output-dir",
        str(out),
        "--per-device-train-batch-size",
        "2",
        *COMMON,
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_two_ranks_equals_one_rank_double_batch(cache_and_reference):
    tmp, cache, single_loss = cache_and_reference
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533"], cache, tmp / "ddp")
    assert first_loss(tmp / "ddp") == pytest.approx(single_loss, abs=1e-5)


def test_deepspeed_zero2_two_ranks(cache_and_reference):
    tmp, cache, single_loss = cache_and_reference
    launcher = [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "configs/accelerate/zero2.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        "29534",
    ]
    launch(launcher, cache, tmp / "zero2")
    assert first_loss(tmp / "zero2") == pytest.approx(single_loss, abs=1e-5)
    assert (tmp / "zero2" / "model.safetensors").exists()
