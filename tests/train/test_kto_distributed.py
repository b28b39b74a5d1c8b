"""KTO on two CPU ranks (gloo): DDP via torchrun and DeepSpeed ZeRO-2 and ZeRO-3 via accelerate launch.

Per-device batch 2, sequential: rank 0 trains rows 0-1, rank 1 rows 2-3 at step 1, each row's KL
partner in its own chunk of 2. TRL's reference point is each rank's mean KL difference, averaged
over ranks, then clamped; the loss is the mean over the step's 4 rows. The step-1 loss and kl the
2-rank runs log must equal that, computed here in one process from the same models. The
reference differs from the policy (a noisier copy), so the KL is not 0 and not clamped.
Slow (three launches, DeepSpeed compiles a comm op on first use): `make test-slow`.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kto_train import noisier
from trainkit import REPO, kto_batch, kto_trainer, make_kto_cache, tiny_model, whole_kl_sequences

from mtdpo.assets import EMBEDDED_TOKENIZER
from mtdpo.train.forward import fused_sequence_logps
from mtdpo.train.kto_loss import kto_loss

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
B = 2


def step_one(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(line for line in lines if line["step"] == 1 and "loss" in line)


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    shutil.copytree(EMBEDDED_TOKENIZER, path, dirs_exist_ok=True)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kto-dist")
    cache = make_kto_cache(tmp, n=4)  # 8 rows
    policy = tiny_model(seed=0)
    reference = noisier(copy.deepcopy(policy))
    paths = save(policy, tmp / "policy"), save(reference, tmp / "reference")
    # what two ranks of TRL's KTOTrainer compute at step 1
    trainer = kto_trainer(cache, policy, reference, tmp, per_device_train_batch_size=B)
    policy, reference = trainer.model, trainer.ref_model  # with the fused LM head the trainer adds
    rank_kl, losses = [], []
    with torch.no_grad():
        batches = [kto_batch(trainer, range(rank * B, rank * B + B)) for rank in (0, 1)]
        for rank in (0, 1):
            kl_batch = whole_kl_sequences(trainer, range(rank * B, rank * B + B))
            kl_diff = fused_sequence_logps(policy, kl_batch)[0] - fused_sequence_logps(reference, kl_batch)[0]
            rank_kl.append(kl_diff.mean())
        kl = torch.stack(rank_kl).mean().clamp(min=0)
        for batch in batches:
            logps = fused_sequence_logps(policy, batch["policy"])[0]
            ref = fused_sequence_logps(reference, batch["policy"])[0]
            losses.append(kto_loss(logps, ref, batch["desirable"], kl, beta=0.1)[0])
    assert kl > 0 and rank_kl[0] != rank_kl[1]  # the average over ranks matters
    return tmp, cache, paths, torch.cat(losses).mean().item(), kl.item()


def launch(launcher: list[str], cache: Path, paths, out: Path, attention: str = "eager") -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "mtdpo", "train", "--data", str(cache), "--output-dir", str(out)]
    cmd += ["--model", str(paths[0]), "--ref-model", str(paths[1]), "--loss-type", "kto"]
    cmd += ["--per-device-train-batch-size", str(B), "--use-cpu", "--bf16", "false", "--max-steps", "2"]
    cmd += ["--logging-steps", "1", "--train-sampling-strategy", "sequential", "--save-strategy", "no"]
    # eager: as the in-process models compute; sdpa: segment attention, whose KL sequences continue
    # the rows' prompts (kto_data.py), the same numbers to fp32 rounding
    cmd += ["--report-to", "none", "--attn-implementation", attention]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_logged(logged: dict, loss: float, kl: float, attention: str) -> None:
    """eager computes what the in-process models do; segment attention sums the log-probs (~ -400
    per sequence) in another order, so its kl (a difference of such sums) agrees to fp32 rounding."""
    tolerance = {"abs": 1e-5} if attention == "eager" else {"rel": 1e-5}
    assert logged["kl"] == pytest.approx(kl, **tolerance)
    assert logged["loss"] == pytest.approx(loss, abs=1e-6 if attention == "eager" else 1e-5)


@pytest.mark.parametrize("attention, port", [("eager", 29543), ("sdpa", 29546)])
def test_ddp_two_ranks_average_the_rank_kl_means(setup, attention, port):
    tmp, cache, paths, loss, kl = setup
    out = tmp / f"ddp-{attention}"
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port)], cache, paths, out, attention)
    logged = step_one(out)
    assert_logged(logged, loss, kl, attention)


@pytest.mark.parametrize(
    "stage, attention, port", [("zero2", "eager", 29544), ("zero3", "eager", 29545), ("zero3", "sdpa", 29547)]
)
def test_deepspeed_two_ranks(setup, stage, attention, port):
    tmp, cache, paths, loss, kl = setup
    launcher = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / f"configs/accelerate/{stage}.yaml")]
    launcher += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port)]
    out = tmp / f"{stage}-{attention}"
    launch(launcher, cache, paths, out, attention)
    logged = step_one(out)
    assert_logged(logged, loss, kl, attention)
    assert (out / "model.safetensors").exists()
