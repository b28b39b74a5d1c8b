"""Interruptions and damage: preprocessing killed with SIGKILL at several moments leaves nothing
train accepts and a rerun gives the same shards; SIGTERM during training saves a checkpoint and
the resumed run has the same losses; a damaged cache is refused naming the file; a non-finite
loss stops training naming the step and rows, or is skipped and counted; runs are reproducible
and nothing runs remote code or unpickles input."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TESTS, cache_dataset, edit_manifest, hidden_leftovers, run_preprocess, write_jsonl
from trainkit import SigtermAt, logged, short_run, with_reference
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mtdpo.cache import read_manifest
from mtdpo.cli import app
from mtdpo.errors import Interrupted, NonFiniteLoss, UsageError
from mtdpo.synthetic import make_pairs
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.run import train
from mtdpo.train.safety import StopOnSignal

PYTHON_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
SHARD = "data-00000-of-00001.arrow"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a busy shared machine OpenMP threads
    spin: a 4-step run took 31 s with 2 threads and 4 s with 1 (the losses do not change)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mtdpo(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mtdpo", *map(str, args)],
        env=PYTHON_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def preprocess_in_child(source: Path, out: Path) -> multiprocessing.Process:
    """`preprocess` in a forked child: the code the CLI runs, without paying its imports again."""
    child = multiprocessing.get_context("fork").Process(target=run_preprocess, args=(source, out))
    child.start()
    return child


def wait_until(alive, ready, timeout: float = 300) -> bool:
    """Poll every 5 ms until ready() (True) or the process ended (False)."""
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.005)
    return False


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# ── preprocessing killed with SIGKILL ─────────────────────────────────────────


def kill_moments(tmp_path: Path, full_size: int) -> dict:
    """When to kill a run writing tmp_path/cache, as predicates of its PID and start time."""

    def part(pid: int) -> Path:  # the shard being streamed, named when the run ends
        return tmp_path / f".cache.incomplete-{pid}" / "data-00000.arrow"

    return {
        "while starting": lambda pid, t0: time.monotonic() - t0 > 0.3,
        "after the first chunk": lambda pid, t0: size(part(pid)) > 100_000,
        "half-way": lambda pid, t0: size(part(pid)) > full_size // 2,
        "writing the cache": lambda pid, t0: (tmp_path / f".cache.incomplete-{pid}" / SHARD).exists(),
    }


def check_killed(tmp_path: Path, out: Path, moment: str, exit_code: int, killed: list) -> None:
    if exit_code == -signal.SIGKILL:
        killed.append(moment)
        assert not out.exists(), moment
    else:  # the run finished before the kill landed: a complete cache, as if not killed
        assert (exit_code, moment) == (0, "writing the cache")
        shutil.rmtree(out)
    for leftover in tmp_path.glob(".cache.*"):  # what a killed run left: never a cache
        with pytest.raises(UsageError, match="temporary directory of an unfinished or interrupted run"):
            read_manifest(leftover)


def check_rerun(tmp_path: Path, out: Path, rows: int) -> None:
    assert hidden_leftovers(tmp_path) == []  # the killed runs' temporary directories are gone
    assert len(cache_dataset(out, verify=True)) == rows
    for name in (SHARD, "rejects.jsonl", "checksums.json", "manifest.json"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_preprocess_survives_sigkill_at_four_moments(tmp_path):
    """1,500 generated rows (6 chunks), preprocessed in a forked child killed with SIGKILL: while
    starting, after the first chunk, half-way, and while the finished cache is being written
    (if the kill lands before the rename). A rerun cleans up and writes the same bytes."""
    source = write_jsonl(tmp_path / "rows.jsonl", list(make_pairs(1500, seed=5)))
    run_preprocess(source, tmp_path / "reference")
    out, killed = tmp_path / "cache", []
    for moment, ready in kill_moments(tmp_path, size(tmp_path / "reference" / SHARD)).items():
        child, t0 = preprocess_in_child(source, out), time.monotonic()
        if wait_until(child.is_alive, lambda: ready(child.pid, t0)):  # noqa: B023 (called before the loop moves on)
            os.kill(child.pid, signal.SIGKILL)
        child.join(300)
        check_killed(tmp_path, out, moment, child.exitcode, killed)
    assert killed[:3] == ["while starting", "after the first chunk", "half-way"]
    assert any(p.name.startswith(".cache.incomplete-") for p in tmp_path.iterdir())  # something to clean up
    run_preprocess(source, out)
    check_rerun(tmp_path, out, 1500)


@pytest.mark.slow
def test_preprocess_cli_survives_sigkill_at_four_moments(tmp_path):
    """The same through `python -m mtdpo preprocess` in a subprocess (each start pays the imports)."""
    source = write_jsonl(tmp_path / "rows.jsonl", list(make_pairs(1500, seed=5)))
    run_preprocess(source, tmp_path / "reference")
    out, killed = tmp_path / "cache", []
    for moment, ready in kill_moments(tmp_path, size(tmp_path / "reference" / SHARD)).items():
        proc, t0 = mtdpo("preprocess", source, "--out", out, "--quiet"), time.monotonic()
        if wait_until(lambda: proc.poll() is None, lambda: ready(proc.pid, t0)):  # noqa: B023 (called before the loop moves on)
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
        check_killed(tmp_path, out, moment, proc.returncode, killed)
    assert killed[:3] == ["while starting", "after the first chunk", "half-way"]
    rerun = mtdpo("preprocess", source, "--out", out, "--quiet")
    assert rerun.communicate(timeout=300)[1] == "" and rerun.returncode == 0
    check_rerun(tmp_path, out, 1500)


def test_a_live_runs_temporary_directory_is_left_alone(tmp_path):
    """Only directories whose process is gone are stale: pytest's parent process is alive."""
    live = tmp_path / f".cache.incomplete-{os.getppid()}"
    live.mkdir()
    dead = tmp_path / ".cache.parts-999999999"
    dead.mkdir()
    other = tmp_path / ".other.parts-999999999"
    other.mkdir()
    run_preprocess(write_jsonl(tmp_path / "rows.jsonl", list(make_pairs(3))), tmp_path / "cache")
    assert hidden_leftovers(tmp_path) == [f".cache.incomplete-{os.getppid()}", ".other.parts-999999999"]


# ── training stopped with SIGTERM ─────────────────────────────────────────────

STEPS = 6


def config(cache: Path, output_dir: Path, **overrides) -> MtdpoConfig:
    # the precision mtdpo picks, as the CLI runs these tests compare with do
    return short_run(cache, output_dir, **{"max_steps": STEPS, "bf16": None, **overrides})


def cli_args(cfg: MtdpoConfig) -> list[str]:
    return [
        "train",
        "--data",
        *cfg.data,
        "--output-dir",
        cfg.output_dir,
        "--use-cpu",
        "--max-steps",
        str(cfg.max_steps),
        "--logging-steps",
        "1",
        "--per-device-train-batch-size",
        "2",
        "--save-strategy",
        "no",
        "--report-to",
        "none",
        "--learning-rate",
        "1e-3",
    ]


def make_cache(tmp: Path, pairs: int) -> Path:
    run_preprocess(write_jsonl(tmp / "rows.jsonl", list(make_pairs(pairs, seed=3))), tmp / "cache")
    return tmp / "cache"


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("small"), 24)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """8 pairs: 4 steps of 2 per epoch."""
    return make_cache(tmp_path_factory.mktemp("tiny"), 8)


def check_resumed(small_cache: Path, straight: Path, stopped: Path, step: int, exact: bool = True) -> None:
    checkpoint = stopped / f"checkpoint-{step}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert not (stopped / "model.safetensors").exists()  # no final model: the run is not finished
    train(config(small_cache, stopped, resume_from_checkpoint="auto"))
    assert sorted(logged(stopped)) == list(range(1, STEPS + 1))
    assert logged(stopped) == (logged(straight) if exact else pytest.approx(logged(straight), abs=1e-6))
    # Weights only as safetensors. The checkpoint's optimizer/RNG state are torch files that
    # transformers loads with weights_only=True (no arbitrary unpickling).
    weights = sorted(
        p.relative_to(stopped).as_posix() for p in stopped.rglob("*") if p.name.startswith(("model", "pytorch_model"))
    )
    assert weights == [f"checkpoint-{step}/model.safetensors", "model.safetensors"]
    assert AutoModelForCausalLM.from_pretrained(str(stopped), use_safetensors=True).config.vocab_size == 2048


def test_sigterm_saves_a_checkpoint_and_resume_gives_the_same_losses(small_cache, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(config(small_cache, straight))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err:
        train(config(small_cache, stopped), callbacks=[SigtermAt(3)])  # the step in flight finishes
    assert signal.getsignal(signal.SIGTERM) is handler  # mtdpo's handler lives only while training
    assert err.value.exit_code == 128 + signal.SIGTERM
    assert (
        str(err.value)
        == f"stopped by SIGTERM after step 3; checkpoint saved to {stopped}/checkpoint-3; go on with --resume-from-checkpoint auto"
    )
    assert sorted(logged(stopped)) == [1, 2, 3]
    check_resumed(small_cache, straight, stopped, 3)


@pytest.mark.slow
def test_sigterm_to_the_train_cli_saves_a_checkpoint(small_cache, tmp_path):
    """`mtdpo train` in a subprocess, SIGTERM from outside: exit code 143 and one line."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(config(small_cache, straight))
    proc = mtdpo(*cli_args(config(small_cache, stopped)))
    metrics = stopped / "metrics.jsonl"
    assert wait_until(lambda: proc.poll() is None, lambda: metrics.exists() and '"step": 2,' in metrics.read_text())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = int(re.search(r"stopped by SIGTERM after step (\d+);", err)[1])
    assert 2 <= step < STEPS
    assert err.splitlines()[-1] == (
        f"stopped by SIGTERM after step {step}; checkpoint saved to {stopped}/checkpoint-{step}; "
        "go on with --resume-from-checkpoint auto"
    )
    check_resumed(small_cache, straight, stopped, step, exact=False)  # another process: the same to 1e-6


def test_further_sigterms_are_ignored():
    """A scheduler and torchrun may both signal each rank: a second SIGTERM must not kill the
    checkpoint being saved (if the handler let it through, it would end this test run)."""
    original = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is original


def worker_of_rank(launcher_pid: int, rank: int) -> int | None:
    """The PID of the torchrun worker with LOCAL_RANK=rank, read from /proc."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == launcher_pid and f"LOCAL_RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(small_cache, tmp_path):
    """DDP on 2 CPU ranks; only rank 1 gets SIGTERM. Rank 0 learns it through an all-reduce at
    the end of the step, so both save the same checkpoint and stop, nobody waits forever."""
    run = tmp_path / "run"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", "29541"]
    args = cli_args(config(small_cache, run, max_steps=40))
    proc = subprocess.Popen(
        [*torchrun, "-m", "mtdpo", *args], env=PYTHON_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    assert wait_until(lambda: proc.poll() is None, lambda: metrics.exists() and '"step": 2,' in metrics.read_text())
    os.kill(worker_of_rank(proc.pid, 1), signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    steps = {int(n) for n in re.findall(r"stopped by SIGTERM after step (\d+);", err)}
    assert len(re.findall(r"stopped by SIGTERM after step", err)) == 2 and len(steps) == 1, err[-3000:]
    step = steps.pop()
    assert 2 <= step < 40 and proc.returncode != 0
    assert json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert (run / f"checkpoint-{step}" / "model.safetensors").exists() and not (run / "model.safetensors").exists()


# ── a non-finite loss ─────────────────────────────────────────────────────────


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_loss_stops_training_naming_step_and_rows(tiny_cache, tmp_path, value):
    cache = with_reference(tiny_cache, tmp_path / "cache", bad_row=5, value=value)
    with pytest.raises(NonFiniteLoss) as err:
        train(config(cache, tmp_path / "run", max_steps=4, bf16=False))  # the columns are fp32 ones
    match = re.fullmatch(
        r"the loss is (\S+) at step (\d+) \(source rows (\d+), (\d+)\); check those rows or lower the learning rate, "
        r"or pass --skip-nonfinite to skip such batches",
        str(err.value),
    )
    assert match and match[1] == str(value) and "5" in match.group(3, 4)
    step = int(match[2])
    assert sorted(logged(tmp_path / "run")) == list(range(1, step))  # every step before it, none after
    assert all(torch.isfinite(torch.tensor(list(logged(tmp_path / "run").values()))))


def test_skip_nonfinite_skips_and_counts(tiny_cache, tmp_path):
    cache = with_reference(tiny_cache, tmp_path / "cache", bad_row=5, value=float("nan"))
    with pytest.raises(NonFiniteLoss) as err:
        train(config(cache, tmp_path / "stop", max_steps=4, bf16=False))
    step = int(re.search(r"at step (\d+)", str(err.value))[1])
    trainer = train(
        config(cache, tmp_path / "skip", max_steps=8, skip_nonfinite=True, bf16=False)
    )  # two epochs: skipped twice
    assert trainer.nonfinite.skipped == 2
    skipped = logged(tmp_path / "skip", "nonfinite_skipped")
    assert min(skipped) == step and skipped[step] == 1 and skipped[8] == 2
    # a skipped step's line has no loss (not 0.0): `skipped` instead (tests/train/test_nonfinite.py)
    assert sorted([*logged(tmp_path / "skip"), *logged(tmp_path / "skip", "skipped")]) == list(range(1, 9))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ── damaged caches ────────────────────────────────────────────────────────────


def damage_shard(cache: Path, how: str) -> None:
    shard = cache / SHARD
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        shard.write_bytes(b"")
    elif how == "bytes flipped":  # same size, valid Arrow: only the SHA-256 sees it
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        shard.write_bytes(bytes(data))
    elif how == "grown":
        shard.write_bytes(bytes(data) + b"\0" * 8)
    elif how == "missing":
        shard.unlink()


DAMAGED = {
    "truncated": "shard {cache}/" + SHARD + " is truncated or corrupt (Expected to be able to read",
    "empty": "shard {cache}/" + SHARD + " is truncated or corrupt (Tried reading schema message, was null or length 0)",
    "bytes flipped": "{cache}/" + SHARD + " is corrupt: its SHA-256 differs from the one in checksums.json",
    "grown": "{cache}/" + SHARD + " is truncated or changed: ",
    "missing": "shard {cache}/" + SHARD + " is missing",
}


@pytest.mark.parametrize("how", list(DAMAGED))
def test_a_damaged_shard_is_refused_naming_the_file(small_cache, tmp_path, how):
    cache = shutil.copytree(small_cache, tmp_path / "cache")
    damage_shard(cache, how)
    with pytest.raises(UsageError) as err:
        train(config(cache, tmp_path / "run", max_steps=1))
    assert str(err.value).startswith(DAMAGED[how].format(cache=cache))


MANIFESTS = {
    "truncated": (lambda text: text[: len(text) // 2], "manifest.json is corrupt: "),
    "not JSON": (lambda text: "\0" * 16, "manifest.json is corrupt: Expecting value: line 1 column 1 (char 0)"),
    "a key lost": (
        lambda text: text.replace('"fingerprint"', '"fingerprnt"'),
        "manifest.json is corrupt: it lacks tokenizer.fingerprint",
    ),
    "wrong schema": (
        lambda text: text.replace('"schema_version": 1', '"schema_version": 9'),
        "manifest.json: schema version 9, this mtdpo reads 1",
    ),
    "a JSON list": (lambda text: "[]", "manifest.json: schema version None, this mtdpo reads 1"),
}


@pytest.mark.parametrize("how", list(MANIFESTS))
def test_a_damaged_manifest_is_refused_naming_the_file(small_cache, tmp_path, how):
    cache = shutil.copytree(small_cache, tmp_path / "cache")
    damage, message = MANIFESTS[how]
    (cache / "manifest.json").write_text(damage((cache / "manifest.json").read_text()))
    with pytest.raises(UsageError) as err:
        cache_dataset(cache)
    assert str(err.value).startswith(f"{cache}/{message}")


def test_damaged_state_and_count_are_refused(small_cache, tmp_path):
    cache = shutil.copytree(small_cache, tmp_path / "cache")
    (cache / "state.json").write_text('{"_data_files": [')
    with pytest.raises(UsageError, match=f"^{cache}/state.json is corrupt: "):
        cache_dataset(cache)
    cache = shutil.copytree(small_cache, tmp_path / "other")
    edit_manifest(cache, lambda m: m["counts"].update(kept=25))
    with pytest.raises(UsageError, match=f"^the shards in {cache} hold 24 pairs but manifest.json says 25$"):
        cache_dataset(cache)


def test_train_cli_names_the_damaged_file_in_one_line(small_cache, tmp_path):
    cache = shutil.copytree(small_cache, tmp_path / "cache")
    damage_shard(cache, "bytes flipped")
    result = CliRunner().invoke(app, cli_args(config(cache, tmp_path / "run", max_steps=1)), terminal_width=400)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr == f"error: {cache}/{SHARD} is corrupt: its SHA-256 differs from the one in checksums.json\n"


# ── reproducibility and safety ────────────────────────────────────────────────


def test_preprocessing_twice_gives_byte_equal_files(tmp_path):
    """Equal: the shards, checksums, manifest, rejects, dataset_info, state and tokenizer copy.
    Not equal: stats.json (timings) and verified.json (the files' modification times)."""
    source = TESTS / "data" / "faults.jsonl"
    run_preprocess(source, tmp_path / "a")
    run_preprocess(source, tmp_path / "b")
    files = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file())
    equal = [f for f in files if (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()]
    assert sorted(set(files) - set(equal)) == ["stats.json", "verified.json"]
    assert SHARD in equal and "checksums.json" in equal and len(files) == 11


def test_remote_code_is_off_unless_asked(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from mtdpo.train.model import load_policy

    seen = []
    real = AutoTokenizer.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spy))
    source = write_jsonl(tmp_path / "rows.jsonl", list(make_pairs(2)))
    assert CliRunner().invoke(app, ["preprocess", str(source), "--out", str(tmp_path / "a"), "-q"]).exit_code == 0
    assert (
        CliRunner()
        .invoke(app, ["preprocess", str(source), "--out", str(tmp_path / "b"), "-q", "--trust-remote-code"])
        .exit_code
        == 0
    )
    assert seen[0] is False and True in seen

    assert MtdpoConfig(data=["x"], output_dir=str(tmp_path)).trust_remote_code is False
    models = []
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: models.append(kw["trust_remote_code"])
    )
    load_policy("some/model", "eager", torch.float32, False)
    assert models == [False]
