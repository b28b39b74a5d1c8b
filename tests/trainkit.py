"""Shared helpers for the training tests: small caches and trainers built in-process."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import socket
from pathlib import Path

import torch
from datasets import Value
from helpers import cache_dataset, run_preprocess, write_jsonl
from transformers import TrainerCallback, set_seed

from mtdpo.assets import EMBEDDED_TOKENIZER
from mtdpo.cache import open_caches
from mtdpo.synthetic import make_pairs
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.data import PairCollator
from mtdpo.train.forward import uses_segment_attention
from mtdpo.train.model import load_policy
from mtdpo.train.plan import Reference, make_plan
from mtdpo.train.provenance import reference_identity
from mtdpo.train.trainer import MultiTurnDPOTrainer

REPO = Path(__file__).resolve().parents[1]


def short_run(cache: Path, output_dir: Path, **overrides) -> MtdpoConfig:
    """A short fp32 run of `cache` on the CPU (4 steps of 2 pairs, no checkpoints), what most
    training tests start from; `overrides` change any option."""
    values = dict(
        data=[str(cache)],
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        max_steps=4,
        logging_steps=1,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to="none",
        learning_rate=1e-3,
    )
    return MtdpoConfig(**{**values, **overrides})


def with_reference(cache: Path, out: Path, bad_row: int, value: float) -> Path:
    """A copy of `cache` with precomputed reference log-probs (-300 each), the chosen side of the
    pair of source row `bad_row` given `value` (NaN, inf: a fault to stop on)."""
    ds = cache_dataset(cache)
    chosen = [value if row == bad_row else -300.0 for row in ds["row"]]
    ds = ds.add_column("ref_chosen_logp", chosen, feature=Value("float32"))
    ds = ds.add_column("ref_rejected_logp", [-300.0] * len(ds), feature=Value("float32"))
    ds.save_to_disk(str(out))
    manifest = json.loads((cache / "manifest.json").read_text())
    # Columns train may use: recorded as made by the run's reference (the tiny model of seed 42).
    manifest["reference"] = {**reference_identity(None, 42), "columns": ["ref_chosen_logp", "ref_rejected_logp"]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(cache / "tokenizer", out / "tokenizer")
    return out


class SigtermAt(TrainerCallback):
    """Sends this process SIGTERM as step `step` begins, as a scheduler would mid-step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def make_cache(tmp: Path, rows=None, n: int = 32, name: str = "cache", **kwargs) -> Path:
    """Preprocess rows (default: n generated multi-turn pairs) into tmp/name."""
    rows = list(make_pairs(n, seed=3)) if rows is None else rows
    run_preprocess(write_jsonl(tmp / f"{name}.jsonl", rows), tmp / name, **kwargs)
    return tmp / name


def kto_rows(n: int, seed: int = 3) -> list[dict]:
    """2n unpaired multi-turn rows ({"messages", "label"}) from n generated pairs: each pair's
    chosen conversation (desirable) then its rejected one (undesirable)."""
    rows = []
    for pair in make_pairs(n, seed=seed):
        prompt = pair.get("prompt", [])
        rows += [{"messages": prompt + pair[side], "label": side == "chosen"} for side in ("chosen", "rejected")]
    return rows


def make_kto_cache(tmp: Path, n: int = 8, name: str = "kto", **kwargs) -> Path:
    """A KTO cache of 2n multi-turn rows (kto_rows)."""
    return make_cache(tmp, kto_rows(n), name=name, **kwargs)


def single_turn_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i + 3} times {i + 7}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {(i + 3) * (i + 7)}."}],
            "rejected": [{"role": "assistant", "content": f"Maybe {(i + 3) * (i + 7) + 1}, I think so."}],
        }
        for i in range(n)
    ]


def saved_start_model(path: Path) -> Path:
    """The seed-0 tiny model saved with the embedded tokenizer (so the tokenizer check passes):
    every run that loads it, in any process, starts from the same weights."""
    tiny_model(seed=0).save_pretrained(path)
    shutil.copytree(EMBEDDED_TOKENIZER, path, dirs_exist_ok=True)
    return path


def tiny_model(seed: int = 0, dtype=torch.float32):
    set_seed(seed)
    return load_policy(None, "eager", dtype, False)


def mtdpo_trainer(
    cache: Path, policy, ref, tmp: Path, reference: Reference | None = None, **config
) -> MultiTurnDPOTrainer:
    """A trainer on `cache` with `ref` as its reference model, or (`reference`=Reference.COLUMNS)
    none: the batches then carry the reference log-probs."""
    # fp32 unless a test asks: the numbers tests compare are fp32 ones (bf16 is auto on CPUs that have it)
    defaults = dict(
        output_dir=str(tmp / "run"), data=[str(cache)], use_cpu=True, per_device_train_batch_size=4, bf16=False
    )
    args = MtdpoConfig(**{**defaults, **config})
    ref = None if ref is None else copy.deepcopy(ref).eval().requires_grad_(False)
    data = open_caches([str(cache)])
    plan = make_plan(args, data, None, policy.config)
    plan = plan if reference is None else dataclasses.replace(plan, reference=reference)
    return MultiTurnDPOTrainer(policy, ref, args, plan, train_dataset=data.pairs, data_collator=PairCollator(0))


def kto_trainer(cache: Path, policy, ref, tmp: Path, reference: Reference | None = None, **config):
    """A MultiTurnKTOTrainer on a KTO cache, as `mtdpo_trainer` builds a DPO one (fp32, padded
    batches unless `padding_free`): its train_dataset is the cache's rows with their KL partners."""
    from mtdpo.train.kto_trainer import kto_run_parts

    defaults = dict(
        output_dir=str(tmp / "run"),
        data=[str(cache)],
        use_cpu=True,
        per_device_train_batch_size=4,
        bf16=False,
        loss_type="kto",
        train_sampling_strategy="sequential",
        # the layout the policy's attention computes (run.py sets the models' attention from the layout)
        attn_implementation="sdpa" if uses_segment_attention(policy) else policy.config._attn_implementation,
    )
    args = MtdpoConfig(**{**defaults, **config})
    ref = None if ref is None else copy.deepcopy(ref).eval().requires_grad_(False)
    data = open_caches([str(cache)])
    plan = make_plan(args, data, None, policy.config)
    plan = plan if reference is None else dataclasses.replace(plan, reference=reference)
    parts = kto_run_parts(args, plan, data, None)
    return parts["trainer"](
        policy, ref, args, plan, train_dataset=parts["train_dataset"], data_collator=parts["collator"]
    )


def kto_batch(trainer, indices) -> dict:
    """The collated batch of the trainer's rows at these dataset positions (their partners included)."""
    return trainer.data_collator([trainer.train_dataset[i] for i in indices])


def whole_kl_sequences(trainer, indices, max_length: int | None = None) -> dict:
    """The KL sequences of the rows at these dataset positions, each whole (prompt + partner's
    completion), padded: what TRL forwards, to check the collator's continuations against."""
    from mtdpo.train.data import padded
    from mtdpo.train.kto_data import kl_sequence

    items = [trainer.train_dataset[i] for i in indices]
    sequences = [kl_sequence(record, partner, max_length)[:2] for record, partner in items]
    return padded([torch.tensor(ids) for ids, _ in sequences], [torch.tensor(labels) for _, labels in sequences], 0)


def loss_metrics_grads(trainer: MultiTurnDPOTrainer, inputs: dict) -> tuple[float, dict, list[torch.Tensor]]:
    """One forward and backward of `inputs` through the trainer's loss: the loss, its logged
    metrics and a copy of every parameter's gradient (to compare two batch layouts)."""
    loss, metrics = trainer.batch_loss(trainer.model, inputs)
    loss.backward()
    return loss.item(), metrics, [p.grad.clone() for p in trainer.model.parameters()]


def batch(cache: Path, indices) -> dict:
    ds = cache_dataset(cache)
    return PairCollator(0)([ds[i] for i in indices])


def precompute(cache: Path, model: str | None = None, **options) -> None:
    """`mtdpo precompute-ref CACHE [--model M]` as a library call, fp32 (as the tests train)."""
    from mtdpo.train.reference import precompute_reference

    config = MtdpoConfig(data=[str(cache)], model=model, use_cpu=True, bf16=False, **options)
    precompute_reference(config, progress=False)


def logged(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """{step: value} of one metric from a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line[key] for line in lines if key in line}


def free_port() -> int:
    """A free localhost port, for a torchrun/accelerate rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
