"""What a checkpoint is to mtdpo: what it was trained on, when it is complete, which one a run
resumes from, and whether its files are still the ones saved.

transformers (and DeepSpeed, FSDP) write `checkpoint-N/`; then mtdpo writes
`checkpoint-N/mtdpo-checkpoint.json`, last and by a rename: the run's record (data, model, loss,
batch geometry, seed: `run_record`) and the SHA-256 of every file in the folder. Without that
file a checkpoint is incomplete (a save cut short by a kill or a full disk): `auto` skips it.
Resuming refuses a checkpoint whose record differs from the run's, naming the option, and one
whose files differ from those hashed (DeepSpeed unpickles its files: docs/RELIABILITY.md, Safety).
A new run refuses an --output-dir that holds checkpoints unless --overwrite-output-dir removes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from mtdpo.cache.files import CHECKSUMS
from mtdpo.cache.manifest import MANIFEST
from mtdpo.errors import UsageError
from mtdpo.fingerprint import sha256_file, sha256_text

MARKER = "mtdpo-checkpoint.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Options a resumed run must share with its checkpoint: they decide what each step trains on and
# how. Not recorded, so free to change: logging, saving, evaluation, precision and the layout
# options (same losses). `learning_rate` and the optimizer's settings are recorded because the
# checkpoint's optimizer and scheduler state restore the old values over new ones (a changed
# --learning-rate was silently ignored).
RECORDED = (
    "kind",
    "data",
    "model",
    "ref_model",
    "seed",
    "data_seed",
    "loss_type",
    "beta",
    "nll_coef",
    "nll_norm",
    "loss_scope",
    "label_smoothing",
    "simpo_gamma",
    "desirable_weight",
    "undesirable_weight",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "train_sampling_strategy",
    "group_by_prompt",
    "max_tokens_per_batch",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "load_in_4bit",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "optim",
    "max_grad_norm",
    "max_steps",
    "num_train_epochs",
)
# The run's length may change on purpose with --resume-new-length (the schedule is stretched to it).
LENGTH = ("max_steps", "num_train_epochs")
LABELS = {
    "kind": "a cache of kind",
    "data": "--data caches whose contents hash to",
    "world_size": "a number of processes (world size) of",
}


def run_record(config, caches: list[Path], kind: str) -> dict:
    """What a run trains on, as recorded in each of its checkpoints: the caches by their contents
    (`cache_fingerprint`), models by path (a local one resolved)."""
    values = {name: getattr(config, name) for name in RECORDED if hasattr(config, name)}
    values.update(
        kind=kind,
        data=[cache_fingerprint(Path(cache)) for cache in caches],
        model=_model_path(config.model),
        ref_model=_model_path(config.ref_model),
        optim=str(getattr(config.optim, "value", config.optim)),
        lr_scheduler_type=str(getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)),
    )
    return json.loads(json.dumps(values))  # as read back from a checkpoint: lists, not tuples


def cache_fingerprint(cache: Path) -> str:
    """A cache's contents in 16 hex digits: the SHA-256 of its checksums.json (which holds each
    shard's), or of its manifest.json for a cache rewritten by a tool that wrote none."""
    source = cache / CHECKSUMS if (cache / CHECKSUMS).is_file() else cache / MANIFEST
    return sha256_text(source.read_text())[:16]


def _model_path(name: str | None) -> str | None:
    return str(Path(name).expanduser().resolve()) if name and Path(name).expanduser().is_dir() else name


# ── writing ───────────────────────────────────────────────────────────────────


def seal(folder: Path, record: dict | None) -> None:
    """Mark a saved checkpoint complete: its record and the SHA-256 of each of its files, written
    to a temporary name and renamed, so the marker exists only whole and only after the files."""
    folder = Path(folder)
    files = {path: sha256_file(folder / path) for path in _files(folder)}
    tmp = folder / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"record": record, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / MARKER)


def _files(folder: Path) -> list[str]:
    """Every file below `folder` but the marker, as sorted relative paths."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if (path.is_file() or path.is_symlink()) and path.name not in (MARKER, f".{MARKER}.tmp")
    )


def claim_output_dir(output_dir: Path, overwrite: bool, main_process: bool) -> None:
    """A new run (not resuming) into a directory holding another run's checkpoints: refused, or
    with --overwrite-output-dir those checkpoints are removed (else `auto` could take one later)."""
    found = checkpoints_in(output_dir)
    if not found:
        return
    names = ", ".join(path.name for path in found[:3]) + (", …" if len(found) > 3 else "")
    if not overwrite:
        raise UsageError(
            f"--output-dir {output_dir} holds checkpoints of another run ({names}); go on with "
            "--resume-from-checkpoint auto, choose another --output-dir, or pass --overwrite-output-dir to remove them"
        )
    if main_process:
        for path in found:
            shutil.rmtree(path)
        print(
            f"note: removed {len(found)} checkpoint(s) of an earlier run from {output_dir} ({names})", file=sys.stderr
        )


# ── resuming ──────────────────────────────────────────────────────────────────


def checkpoints_in(output_dir: Path) -> list[Path]:
    """The checkpoint-N folders of a directory, newest (highest N) first."""
    if not Path(output_dir).is_dir():
        return []
    found = [path for path in Path(output_dir).iterdir() if CHECKPOINT.match(path.name) and path.is_dir()]
    return sorted(found, key=lambda path: -int(CHECKPOINT.match(path.name)[1]))


def read_marker(folder: Path) -> dict | None:
    """The checkpoint's marker, or None if it is incomplete (no marker, or one that does not read)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None


def resume_point(config, record: dict) -> str | None:
    """The checkpoint this run resumes from (None: it starts at step 0), after checking that it is
    complete, that its files are the ones saved and that it was trained as this run trains.
    `auto` takes the newest complete checkpoint in --output-dir, skipping incomplete ones."""
    wanted, main = config.resume_from_checkpoint, config.process_index == 0
    if not wanted:
        claim_output_dir(Path(config.output_dir), config.overwrite_output_dir, main)
        return None
    if wanted == "auto":
        found = checkpoints_in(config.output_dir)
        folder = next((path for path in found if read_marker(path)), None)
        skipped = [path.name for path in found[: found.index(folder) if folder else None]]  # newer, incomplete
        if main and found:
            print(_auto_note(folder, skipped), file=sys.stderr)
        if folder is None:
            return None
    else:
        folder = Path(wanted)
        if not folder.is_dir():
            raise UsageError(f"--resume-from-checkpoint {wanted}: no such directory")
    marker = read_marker(folder)
    if marker is None:
        raise UsageError(
            f"cannot resume from {folder}: it is incomplete (no readable {MARKER}: its save was cut short, "
            "or an mtdpo without checkpoint records wrote it)"
        )
    check_intact(folder, marker["files"])
    check_record(folder, marker.get("record") or {}, record, config.resume_new_length)
    return str(folder)


def _auto_note(folder: Path | None, skipped: list[str]) -> str:
    incomplete = f"; skipped {', '.join(skipped)}: incomplete (a save cut short)" if skipped else ""
    if folder is None:
        return f"note: no complete checkpoint to resume from{incomplete}; starting at step 0"
    return f"note: resuming from {folder}, the newest complete checkpoint{incomplete}"


def check_intact(folder: Path, files: dict[str, str]) -> None:
    """Every file of the checkpoint as hashed when it was saved, and no other."""
    present = _files(folder)
    for path in present:
        if (folder / path).is_symlink():  # Trainer and DeepSpeed write none; one could point anywhere
            raise UsageError(f"cannot resume from {folder}: {path} is a symbolic link, which no save writes")
    for path in sorted(set(files) - set(present)):
        raise UsageError(f"cannot resume from {folder}: {path} is missing (it was saved, {MARKER} lists it)")
    for path in present:
        if path not in files:
            raise UsageError(
                f"cannot resume from {folder}: {path} was not saved by the run ({MARKER} does not list it); "
                "checkpoint files are loaded with pickle by DeepSpeed, so only the files saved are trusted"
            )
        if sha256_file(folder / path) != files[path]:
            raise UsageError(
                f"cannot resume from {folder}: {path} changed since it was saved (its SHA-256 differs from {MARKER}); "
                "checkpoint files are loaded with pickle by DeepSpeed, so only the files saved are trusted"
            )


def check_record(folder: Path, saved: dict, record: dict, new_length: bool) -> None:
    """The run trains on what the checkpoint was trained on; only its length may change, on request."""
    for name in RECORDED:
        old, new = saved.get(name), record.get(name)
        if old == new or (name in LENGTH and new_length):
            continue
        label = LABELS.get(name, f"--{name.replace('_', '-')}")
        hint = (
            "pass --resume-new-length to change the run's length (the schedule is stretched to it)"
            if name in LENGTH
            else "resume with the checkpoint's value, or start a new run in another --output-dir"
        )
        raise UsageError(
            f"cannot resume from {folder}: it was trained with {label} {_show(old)}, this run with {_show(new)}; {hint}"
        )


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)
