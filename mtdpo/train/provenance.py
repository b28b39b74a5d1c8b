"""Where precomputed reference log-probs came from, and whether a run may use them.

`mtdpo precompute-ref` records the reference's identity in the manifest: its path and a SHA-256
of its weights. `mtdpo train` uses the columns only if they come from the run's reference
(`--ref-model`, by default `--model`), and never mixes caches that disagree; each refusal is one
line naming the caches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from mtdpo.cache import Manifest
from mtdpo.errors import UsageError
from mtdpo.fingerprint import weights_sha256
from mtdpo.train.model import load_policy


def reference_identity(name_or_path: str | None, seed: int) -> dict:
    """{"path", "seed", "weights_sha256"} of a model: a saved one (a directory, or a hub id in the
    local cache), or the tiny random default model built with `seed` (path None)."""
    if name_or_path is None:
        return {"path": None, "seed": seed, "weights_sha256": tiny_model_sha256(seed)}
    local = Path(name_or_path).expanduser()
    directory = local if local.is_dir() else hub_snapshot(name_or_path)
    return {
        "path": str(local.resolve()) if local.is_dir() else name_or_path,
        "seed": None,
        "weights_sha256": weights_of(directory),
    }


def weights_of(directory: Path) -> str:
    sha = weights_sha256(directory)
    if sha is None:
        raise UsageError(f"no weight files (*.safetensors, *.bin) in {directory}")
    return sha


def tiny_model_sha256(seed: int) -> str:
    """The tiny default model is random: hash its tensors as `seed` initialises them."""
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        state = load_policy(None, "eager", torch.float32, False).state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + b"\0" + state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def hub_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError) as err:  # not downloaded (LocalEntryNotFoundError), or not a repository id
        raise UsageError(
            f"cannot find the weights of {name} to check the cache's reference ({type(err).__name__})"
        ) from None


def describe(identity) -> str:
    path, seed, sha = identity.path, identity.seed, identity.weights_sha256
    who = path if path else f"the tiny random model (seed {seed})"
    return f"{who} (weights {sha[:12]})"


def check_provenance(caches: list[tuple[str, Manifest]], ref_model: str | None, model: str | None, seed: int) -> None:
    """Every cache whose reference columns the run would use (path, manifest) must come from one
    reference, the run's own: `--ref-model`, by default `--model` (the tiny model: `--seed`)."""
    if not caches:
        return
    for path, manifest in caches:
        if manifest.reference is None or not manifest.reference.weights_sha256:
            raise UsageError(
                f"cache {path} holds reference log-probs with no record of the model that made them (an older mtdpo); "
                f"re-run `mtdpo precompute-ref {path} --model REF`"
            )
    (first, recorded), *others = [(path, manifest.reference) for path, manifest in caches]
    for path, other in others:
        if other.weights_sha256 != recorded.weights_sha256:
            raise UsageError(
                f"caches {first} and {path} hold reference log-probs of different models: "
                f"{describe(recorded)} and {describe(other)}; precompute both with one"
            )
    name = ref_model or model
    identity = reference_identity(name, seed)
    if identity["weights_sha256"] != recorded.weights_sha256:
        if ref_model:
            run_reference = f"--ref-model {ref_model}"
        else:
            run_reference = (
                f"--model {model} (the default reference)" if model else f"the tiny random model of --seed {seed}"
            )
        use_them = f"--ref-model {recorded.path}" if recorded.path else f"--seed {recorded.seed}"
        raise UsageError(
            f"cache {first} holds reference log-probs of {describe(recorded)}, not of {run_reference} (weights "
            f"{identity['weights_sha256'][:12]}): pass {use_them} to train with them, or re-run `mtdpo precompute-ref {first}"
            f"{f' --model {name}' if name else f' --seed {seed}'}`"
        )
