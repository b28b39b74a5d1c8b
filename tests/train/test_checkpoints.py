"""Checkpoints one can trust (issue 29, items 7, 8, 11, 11b, 13; mtdpo/train/checkpoints.py):
a new run never mixes with another run's checkpoints, a resumed run trains on what its
checkpoint was trained on, `auto` takes only a complete checkpoint, a run stopped in its last
step resumes with nothing to train, and a checkpoint whose files changed is never loaded.

16 pairs, batch 2: 8 steps per epoch, so a 4-step run ends inside the first epoch."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainkit import REPO, SigtermAt, logged, make_cache, short_run
from typer.testing import CliRunner

from mtdpo.cli import app
from mtdpo.errors import Interrupted, UsageError
from mtdpo.fingerprint import sha256_file
from mtdpo.train.checkpoints import MARKER
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.run import train


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("checkpoints"), n=16)


def config(cache: Path, output_dir: Path, **overrides) -> MtdpoConfig:
    return short_run(cache, output_dir, **{"save_strategy": "steps", "save_steps": 2, **overrides})


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoint-2 and checkpoint-4."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(config(cache, run))
    return run


def files_of(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ── 7: another run's checkpoints ──────────────────────────────────────────────


def test_a_new_run_refuses_an_output_dir_holding_checkpoints(cache, straight, tmp_path):
    run = shutil.copytree(straight, tmp_path / "run")
    before = files_of(run)
    with pytest.raises(UsageError) as err:
        train(config(cache, run, max_steps=6, beta=0.5))
    assert str(err.value) == (
        f"--output-dir {run} holds checkpoints of another run (checkpoint-4, checkpoint-2); go on with "
        "--resume-from-checkpoint auto, choose another --output-dir, or pass --overwrite-output-dir to remove them"
    )
    assert files_of(run) == before  # nothing touched


def test_overwrite_output_dir_removes_them_so_auto_takes_this_runs_checkpoint(cache, straight, tmp_path, capsys):
    """The issue's run: an older run's checkpoint-4 in the output directory, the new run stopped
    by SIGTERM at step 3; `auto` used to resume from the older run's checkpoint-4."""
    run = shutil.copytree(straight, tmp_path / "run")
    with pytest.raises(Interrupted):
        train(config(cache, run, save_strategy="no", overwrite_output_dir=True), callbacks=[SigtermAt(3)])
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]
    assert f"note: removed 2 checkpoint(s) of an earlier run from {run} (checkpoint-4, checkpoint-2)" in (
        capsys.readouterr().err
    )
    train(config(cache, run, save_strategy="no", resume_from_checkpoint="auto"))
    assert f"note: resuming from {run}/checkpoint-3, the newest complete checkpoint" in capsys.readouterr().err
    assert logged(run) == logged(straight)  # steps 1-4, as the straight run (same seed and data)


# ── 11: resuming with other options ───────────────────────────────────────────

CHANGES = {  # option: (the resumed run's value, how the error names what the checkpoint has)
    "beta": (0.5, "--beta 0.1, this run with 0.5"),
    "loss_type": ("ipo", "--loss-type sigmoid, this run with ipo"),
    "nll_coef": (0.0, "--nll-coef 1.0, this run with 0.0"),
    "per_device_train_batch_size": (4, "--per-device-train-batch-size 2, this run with 4"),
    "gradient_accumulation_steps": (2, "--gradient-accumulation-steps 1, this run with 2"),
    "seed": (7, "--seed 42, this run with 7"),
    "learning_rate": (1e-2, "--learning-rate 0.001, this run with 0.01"),
    "max_steps": (6, "--max-steps 4, this run with 6"),
}


@pytest.mark.parametrize("option", list(CHANGES))
def test_resume_refuses_a_checkpoint_trained_otherwise_naming_the_option(cache, straight, option):
    value, named = CHANGES[option]
    checkpoint = straight / "checkpoint-2"
    with pytest.raises(UsageError) as err:
        train(config(cache, straight, resume_from_checkpoint=str(checkpoint), **{option: value}))
    hint = (
        "pass --resume-new-length to change the run's length (the schedule is stretched to it)"
        if option == "max_steps"
        else "resume with the checkpoint's value, or start a new run in another --output-dir"
    )
    assert str(err.value) == f"cannot resume from {checkpoint}: it was trained with {named}; {hint}"


def test_resume_refuses_other_data_and_another_model(cache, straight, tmp_path):
    other = make_cache(tmp_path, n=12, name="other")
    checkpoint = str(straight / "checkpoint-2")
    with pytest.raises(UsageError, match=r"it was trained with --data caches whose contents hash to \w{16}, this"):
        train(config(other, straight, resume_from_checkpoint=checkpoint))
    from trainkit import saved_start_model

    model = saved_start_model(tmp_path / "start")
    with pytest.raises(UsageError, match=f"it was trained with --model none, this run with {model}; "):
        train(config(cache, straight, resume_from_checkpoint=checkpoint, model=str(model)))


def test_a_new_length_needs_resume_new_length_and_this_runs_steps_are_counted(cache, straight, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(straight / "checkpoint-4", run / "checkpoint-4")
    train(config(cache, run, max_steps=6, resume_from_checkpoint="auto", resume_new_length=True))
    assert sorted(logged(run)) == [5, 6]
    out = capsys.readouterr().out
    assert "done: 2 steps in " in out  # was "done: 6 steps": the checkpoint's steps counted as this run's


def test_the_cli_refuses_in_one_line(cache, straight):
    args = ["train", "--data", str(cache), "--output-dir", str(straight), "--use-cpu", "--no-bf16"]
    args += ["--per-device-train-batch-size", "2", "--max-steps", "4", "--report-to", "none", "--beta", "0.3"]
    result = CliRunner().invoke(app, [*args, "--resume-from-checkpoint", "auto"], terminal_width=400)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot resume from {straight}/checkpoint-4: it was trained with --beta 0.1, this run with 0.3; "
        "resume with the checkpoint's value, or start a new run in another --output-dir"
    )


# ── 8: incomplete checkpoints ─────────────────────────────────────────────────


def test_every_checkpoint_records_its_run_and_the_sha256_of_each_file(straight):
    for name in ("checkpoint-2", "checkpoint-4"):
        marker = json.loads((straight / name / MARKER).read_text())
        files = [f for f in files_of(straight / name) if f != MARKER]
        assert sorted(marker["files"]) == files and "model.safetensors" in files and "optimizer.pt" in files
        assert all(marker["files"][f] == sha256_file(straight / name / f) for f in files)
        record = marker["record"]
        assert (record["loss_type"], record["beta"], record["per_device_train_batch_size"], record["seed"]) == (
            "sigmoid",
            0.1,
            2,
            42,
        )
        assert record["kind"] == "pair" and len(record["data"]) == 1 and record["model"] is None


def test_auto_skips_a_save_cut_short_and_says_so(cache, straight, tmp_path, monkeypatch, capsys):
    """The save of checkpoint-4 fails half-way (a full disk); `auto` goes on from checkpoint-2
    with the same losses, and the new checkpoint-4 replaces the broken one whole."""
    from transformers import Trainer

    run = tmp_path / "run"
    save_rng = Trainer._save_rng_state

    def disk_full_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            Path(output_dir, "model.safetensors").write_bytes(b"cut")  # and the weights truncated
            raise OSError(28, "No space left on device")
        return save_rng(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full_at_step_4)
    with pytest.raises(OSError):
        train(config(cache, run))
    monkeypatch.undo()
    broken = files_of(run / "checkpoint-4")
    capsys.readouterr()
    train(config(cache, run, resume_from_checkpoint="auto"))  # was a SafetensorError traceback
    assert capsys.readouterr().err.splitlines()[0] == (
        f"note: resuming from {run}/checkpoint-2, the newest complete checkpoint; "
        "skipped checkpoint-4: incomplete (a save cut short)"
    )
    assert logged(run) == logged(straight)
    assert "trainer_state.json" not in broken and MARKER not in broken  # the save stopped before either
    assert (run / "checkpoint-4" / MARKER).exists()
    assert load_file(run / "checkpoint-4" / "model.safetensors").keys() == load_file(run / "model.safetensors").keys()


def test_old_checkpoints_are_rotated_out_only_once_the_new_one_is_complete(cache, tmp_path, monkeypatch):
    """--save-total-limit 1: Trainer deleted checkpoint-2 inside the save of checkpoint-4, before
    mtdpo marks it complete; a kill in between would leave no complete checkpoint."""
    from mtdpo.train import checkpoints

    seal = checkpoints.seal

    def killed_while_sealing_step_4(folder, record):
        if folder.name == "checkpoint-4":
            raise KeyboardInterrupt
        seal(folder, record)

    monkeypatch.setattr(checkpoints, "seal", killed_while_sealing_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(config(cache, tmp_path / "run", save_total_limit=1))
    assert (tmp_path / "run" / "checkpoint-2" / MARKER).exists()
    monkeypatch.undo()
    train(config(cache, tmp_path / "other", save_total_limit=1))
    assert sorted(p.name for p in (tmp_path / "other").glob("checkpoint-*")) == ["checkpoint-4"]


def test_auto_with_no_complete_checkpoint_starts_at_step_0(cache, straight, tmp_path, capsys):
    run = shutil.copytree(straight, tmp_path / "run")
    for marker in run.glob(f"checkpoint-*/{MARKER}"):
        marker.unlink()
    train(config(cache, run, resume_from_checkpoint="auto"))
    assert capsys.readouterr().err.splitlines()[0] == (
        "note: no complete checkpoint to resume from; skipped checkpoint-4, checkpoint-2: incomplete (a save cut "
        "short); starting at step 0"
    )
    assert logged(run) == logged(straight)


def test_an_incomplete_checkpoint_named_explicitly_is_refused(cache, straight, tmp_path):
    checkpoint = shutil.copytree(straight / "checkpoint-2", tmp_path / "checkpoint-2")
    (checkpoint / MARKER).unlink()
    with pytest.raises(UsageError, match=f"^cannot resume from {checkpoint}: it is incomplete \\(no readable {MARKER}"):
        train(config(cache, tmp_path / "run", resume_from_checkpoint=str(checkpoint)))


# ── 13: files changed after the save ──────────────────────────────────────────

PICKLE = "checkpoint files are loaded with pickle by DeepSpeed, so only the files saved are trusted"
DAMAGE = {
    "a byte appended": (
        lambda c: (c / "optimizer.pt").open("ab").write(b"\0"),
        f"optimizer.pt changed since it was saved (its SHA-256 differs from {MARKER}); {PICKLE}",
    ),
    "a file added": (
        lambda c: (c / "payload.pt").write_bytes(b"x"),
        f"payload.pt was not saved by the run ({MARKER} does not list it); {PICKLE}",
    ),
    "a file removed": (
        lambda c: (c / "rng_state.pth").unlink(),
        f"rng_state.pth is missing (it was saved, {MARKER} lists it)",
    ),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_checkpoint_whose_files_changed_is_refused(cache, straight, tmp_path, how):
    damage, message = DAMAGE[how]
    run = tmp_path / "run"
    run.mkdir()
    checkpoint = shutil.copytree(straight / "checkpoint-2", run / "checkpoint-2")
    damage(checkpoint)
    with pytest.raises(UsageError) as err:
        train(config(cache, run, resume_from_checkpoint="auto"))
    assert str(err.value) == f"cannot resume from {checkpoint}: {message}"


# ── 11b: stopped in the last step ─────────────────────────────────────────────


def test_sigterm_in_the_last_step_resumes_with_nothing_to_train(cache, tmp_path, capsys):
    """LoRA, --max-steps 4, SIGTERM during step 4: checkpoint-4 and no final model; the resumed
    run used to train a step 5 of 4. Now it writes the adapters and the merged model from it."""
    run = tmp_path / "run"
    options = dict(save_strategy="no", lora_r=4, merge_adapters=True)
    with pytest.raises(Interrupted, match="after step 4;"):
        train(config(cache, run, **options), callbacks=[SigtermAt(4)])
    assert not (run / "adapter").exists() and not (run / "model.safetensors").exists()
    capsys.readouterr()
    train(config(cache, run, resume_from_checkpoint="auto", **options))
    out = capsys.readouterr().out
    assert "nothing to train: resumed at step 4 of 4" in out and "step 5" not in out and "done:" not in out
    assert sorted(logged(run)) == [1, 2, 3, 4]
    saved, final = (
        load_file(run / "checkpoint-4" / "adapter_model.safetensors"),
        load_file(run / "adapter" / "adapter_model.safetensors"),
    )
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)
    assert (run / "model.safetensors").exists()  # the merged model


# ── 13 under DeepSpeed: a pickle payload in a checkpoint file never runs ──────


class Payload:
    """Unpickling it creates a file: what a payload added to a checkpoint would run instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def zero2(cache: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """2 CPU ranks under DeepSpeed ZeRO-2 (accelerate launch), batch 2, checkpoints every 2 steps."""
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file"]
    launcher += [str(REPO / "configs/accelerate/zero2.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
    options = ["--data", str(cache), "--output-dir", str(out), "--use-cpu", "--bf16", "false", "--max-steps", "4"]
    options += ["--per-device-train-batch-size", "2", "--save-steps", "2", "--report-to", "none"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [*launcher, "--main_process_port", "29547", "-m", "mtdpo", "train", *options, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_pickle_payload_in_a_deepspeed_checkpoint_is_refused_before_it_is_loaded(cache, tmp_path):
    """DeepSpeed loads its checkpoint files with torch.load(weights_only=False): a payload put in
    mp_rank_00_model_states.pt used to run on resume. mtdpo-checkpoint.json lists every file
    DeepSpeed wrote, and a file that differs is refused before DeepSpeed opens it."""
    run = tmp_path / "run"
    assert zero2(cache, run).returncode == 0
    files = json.loads((run / "checkpoint-4" / MARKER).read_text())["files"]
    states = "global_step4/mp_rank_00_model_states.pt"
    assert states in files and any(f.endswith("zero_pp_rank_1_mp_rank_00_optim_states.pt") for f in files)
    pwned = tmp_path / "pwned"
    (run / "checkpoint-4" / states).write_bytes(pickle.dumps(Payload(pwned)))
    result = zero2(cache, run, "--resume-from-checkpoint", "auto")
    assert result.returncode != 0 and not pwned.exists()
    assert (
        f"error: cannot resume from {run}/checkpoint-4: {states} changed since it was saved (its SHA-256 differs "
        f"from {MARKER}); checkpoint files are loaded with pickle by DeepSpeed" in result.stderr
    )
