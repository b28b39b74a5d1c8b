"""Several machines, simulated on localhost: 2 "machines" × 2 CPU ranks (gloo), launched as on a
real cluster with `accelerate launch --num_machines 2 --machine_rank R --main_process_ip
127.0.0.1 --main_process_port P` and each of configs/accelerate/{ddp,zero2,zero3,fsdp}.yaml.

- Steps 1 and 2 of 4 ranks with per-device batch 2 give the losses of 1 rank with batch 8
  (DPO is a mean over pairs; the NLL divides by the chosen tokens of all ranks), and the final
  model, gathered into one file (ZeRO-3, FSDP), loads with AutoModelForCausalLM and holds the
  1-rank weights.
- On 2 ranks, length-grouped and random batches are disjoint across ranks and a run resumed
  inside epoch 2 trains on the same rows with the same losses as an uninterrupted one.

Every run starts from one saved model: ZeRO-3 initialises a random model shard by shard, so
its random weights differ from a single process's. Slow (a minute or more per launch on a busy
2-core machine): `make test-slow`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cache_dataset
from trainkit import REPO, free_port, logged, make_cache, saved_start_model
from transformers import AutoModelForCausalLM

from mtdpo.cache import open_cache
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.run import train
from mtdpo.train.sampler import group_batches

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
COMMON = ["--use-cpu", "--bf16", "false", "--logging-steps", "1", "--report-to", "none", "--learning-rate", "1e-4"]
# accelerate (1.15) looks for a GPU-like device when FSDP syncs module states or loads
# "cpu-ram-efficiently"; on CPU ranks both must be off (docs/SCALING.md).
FSDP_ON_CPU = ["--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 16-pair cache, a saved starting model, and the 1-rank run with batch 8 (2 steps)."""
    tmp = tmp_path_factory.mktemp("multinode")
    cache = make_cache(tmp, n=16)
    init = saved_start_model(tmp / "init")
    train(
        MtdpoConfig(
            data=[str(cache)],
            model=str(init),
            output_dir=str(tmp / "single"),
            use_cpu=True,
            max_steps=2,
            logging_steps=1,
            per_device_train_batch_size=8,
            train_sampling_strategy="sequential",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            learning_rate=1e-4,
            bf16=False,
        )
    )
    return tmp, cache, init


def run_all(commands: list[list[str]], logs: list[Path], env=ENV) -> None:
    """Start the commands together (the "machines"), wait for all; output goes to files, not
    pipes, so that no rank blocks on a full pipe while the others wait in a collective."""
    procs = []
    for command, log in zip(commands, logs):
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        assert proc.returncode == 0, log.read_text()[-4000:]


@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3", "fsdp"])
def test_two_machines_of_two_ranks_equal_one_rank_with_four_times_the_batch(setup, config):
    tmp, cache, init = setup
    out, port = tmp / config, free_port()
    commands = [
        [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(REPO / f"configs/accelerate/{config}.yaml"),
            "--num_machines",
            "2",
            "--machine_rank",
            str(machine),
            "--num_processes",
            "4",  # processes of all machines
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--mixed_precision",
            "no",
            *(FSDP_ON_CPU if config == "fsdp" else []),
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
            "2",
            "--train-sampling-strategy",
            "sequential",
            "--save-strategy",
            "no",
            *COMMON,
        ]
        for machine in (0, 1)
    ]
    run_all(commands, [tmp / f"{config}-machine-{machine}.log" for machine in (0, 1)])

    single = logged(tmp / "single")
    assert sorted(logged(out)) == [1, 2]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs[:2] == [0.5, 1.0]  # 4 ranks × 2 pairs: 16 pairs in 2 steps (2 ranks would give 0.25, 0.5)
    assert logged(out) == pytest.approx(single, abs=1e-5)
    assert single[1] != pytest.approx(single[2], abs=1e-4)  # the step moved the weights
    # One consolidated safetensors file (ZeRO-3 and FSDP gather the shards), the 1-rank weights.
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    weights = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(str(tmp / "single")).state_dict()
    start = AutoModelForCausalLM.from_pretrained(str(init)).state_dict()
    assert weights.keys() == expected.keys()
    assert max((weights[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
    assert max((weights[k] - start[k]).abs().max().item() for k in expected) > 1e-5


def torchrun_two_ranks(cache: Path, init: Path, out: Path, rows_dir: Path, *extra: str) -> None:
    rows_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests/record_rows.py"),
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
        "8",
        "--save-strategy",
        "steps",
        "--save-steps",
        "3",
        *COMMON,
        *extra,
    ]
    run_all([command], [out.parent / f"{out.name}.log"], env={**ENV, "MTDPO_ROWS_DIR": str(rows_dir)})


def rows_by_step(rows_dir: Path) -> dict[int, list[list[int]]]:
    """step -> [rows of rank 0, rows of rank 1]"""
    steps: dict[int, list[list[int]]] = {}
    for rank in (0, 1):
        for line in (rows_dir / f"rank-{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], [[], []])[rank] = entry["rows"]
    return steps


@pytest.mark.parametrize("strategy", ["group_by_length", "random", "prompt"])
def test_batches_across_two_ranks_and_resume_inside_epoch_two(setup, strategy):
    """On 2 ranks with per-device batch 2, an epoch is 4 steps. Default sampling (group_by_length):
    transformers' sampler sorts megabatches of 4 pairs (16 // (2 * 4) = 2 batches) by length and
    puts the longest first; accelerate deals the batches out to the ranks in turn, so each step's
    4 pairs are one megabatch, longest first. Stopped after step 6 (inside epoch 2) and resumed:
    the same rows and losses (the skipped batches' wrappers hide the epoch from the sampler).
    "prompt": `--prefix-forest` (micro-batches grouped by prompt, dealt out by mtdpo's own
    rank-aware sampler): the same, with the micro-batches `group_batches` fixed."""
    tmp, cache, init = setup
    straight, resumed = tmp / f"straight-{strategy}", tmp / f"resumed-{strategy}"
    sampling = ("--prefix-forest",) if strategy == "prompt" else ("--train-sampling-strategy", strategy)
    torchrun_two_ranks(cache, init, straight, tmp / f"rows-straight-{strategy}", *sampling)
    seen = rows_by_step(tmp / f"rows-straight-{strategy}")
    assert sorted(seen) == [1, 2, 3, 4, 5, 6, 7, 8]

    ds = cache_dataset(cache)
    length = dict(zip(ds["row"], (max(c, r) for c, r in zip(ds["chosen_len"], ds["rejected_len"]))))
    epochs = [
        [seen[step][0] + seen[step][1] for step in steps] for steps in ((1, 2, 3, 4), (5, 6, 7, 8))
    ]  # 4 steps x 2 ranks x 2 pairs
    for epoch in epochs:
        assert sorted(row for batch in epoch for row in batch) == sorted(ds["row"])  # every pair once: ranks disjoint
        assert [row for batch in epoch for row in batch] != sorted(ds["row"])  # not the sequential order
        if strategy == "group_by_length":
            for batch in epoch:
                assert [length[row] for row in batch] == sorted((length[row] for row in batch), reverse=True)
            assert length[epoch[0][0]] == max(length.values())
        if strategy == "prompt":
            fixed = group_batches(*open_cache(cache).pairs.prompts(), seed=42, batch_size=2)
            assert sorted(sorted(ds["row"][k] for k in b) for b in fixed) == sorted(
                sorted(seen[step][rank]) for step in (1, 2, 3, 4) for rank in (0, 1)
            )
    assert epochs[0] != epochs[1]  # a new shuffle in epoch 2

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-6", resumed / "checkpoint-6")  # what a run stopped after step 6 leaves
    torchrun_two_ranks(
        cache, init, resumed, tmp / f"rows-resumed-{strategy}", *sampling, "--resume-from-checkpoint", "auto"
    )
    again = rows_by_step(tmp / f"rows-resumed-{strategy}")
    assert sorted(again) == [7, 8]
    assert {step: again[step] for step in (7, 8)} == {step: seen[step] for step in (7, 8)}
    before, after = logged(straight), logged(resumed)
    assert sorted(after) == [7, 8]
    for step in (7, 8):
        assert after[step] == pytest.approx(before[step], abs=1e-6)
    assert len({round(before[step], 6) for step in (6, 7, 8)}) == 3
