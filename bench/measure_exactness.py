"""Does stage two train exactly what it says? Two measurements on the bundled sample (CPU, tiny model):

1. Resume: 16 pairs, batch 2, 2 epochs (16 steps). An uninterrupted run saves checkpoints; runs
   resumed from step 10 (inside epoch 2) and step 8 (the epoch boundary) must train the same
   rows with the same losses. Printed per sampler: the largest loss difference after the
   resume, and the pairs of epoch 2 trained twice / never.
2. Accumulation: one SGD step (lr 1) from the same weights with batch 4 x accumulation 1 and
   batch 2 x accumulation 2 (the same 4 pairs). Printed: the largest difference between the two
   updates, and the largest update.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python bench/measure_exactness.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from mtdpo.assets import EMBEDDED_TOKENIZER
from mtdpo.preprocess.pipeline import preprocess
from mtdpo.train import run as run_module
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.model import load_policy
from mtdpo.train.trainer import MultiTurnDPOTrainer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "mtdpo" / "assets" / "sample.jsonl"


def record_rows(trained: list):
    """Patch the trainer so that every training batch's source rows are appended to `trained`."""
    compute_loss = MultiTurnDPOTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            trained.append((self.state.global_step + 1, inputs["rows"].tolist()))
        return compute_loss(self, model, inputs, *args, **kwargs)

    MultiTurnDPOTrainer.compute_loss = recording
    return lambda: setattr(MultiTurnDPOTrainer, "compute_loss", compute_loss)


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def config(cache: Path, out: Path, **overrides) -> MtdpoConfig:
    values = dict(
        data=[str(cache)],
        output_dir=str(out),
        use_cpu=True,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        per_device_train_batch_size=2,
        num_train_epochs=2,
        learning_rate=1e-3,
        save_strategy="no",
    )
    return MtdpoConfig(**{**values, **overrides})


def train_recording(cfg: MtdpoConfig) -> dict[int, list[int]]:
    trained: list = []
    restore = record_rows(trained)
    try:
        run_module.train(cfg)
    finally:
        restore()
    return dict(trained)


def measure_resume(cache: Path, tmp: Path, strategy: str, show_losses: bool = False) -> list[str]:
    straight = tmp / f"{strategy}-straight"
    rows = train_recording(
        config(cache, straight, train_sampling_strategy=strategy, save_strategy="steps", save_steps=2)
    )
    epoch2 = [row for step in range(9, 17) for row in rows[step]]
    lines = []
    for checkpoint in (10, 8):
        resumed = tmp / f"{strategy}-from-{checkpoint}"
        resumed.mkdir()
        shutil.copytree(straight / f"checkpoint-{checkpoint}", resumed / f"checkpoint-{checkpoint}")
        again = train_recording(config(cache, resumed, train_sampling_strategy=strategy, resume_from_checkpoint="auto"))
        before, after = losses(straight), losses(resumed)
        worst = max(abs(after[step] - before[step]) for step in range(checkpoint + 1, 17))
        replayed = [row for step in range(9, checkpoint + 1) for row in rows[step]] + [
            row for step in range(checkpoint + 1, 17) for row in again[step]
        ]
        counts = Counter(replayed)
        twice = sorted(row for row, n in counts.items() if n > 1)
        never = sorted(set(epoch2) - set(counts))
        same = all(again[step] == rows[step] for step in range(checkpoint + 1, 17))
        lines.append(
            f"resume {strategy:<16} from step {checkpoint:>2}: max |loss diff| {worst:.2e}  same rows {same}  "
            f"epoch-2 pairs trained twice {twice or '-'}  never {never or '-'}"
        )
        if show_losses:
            for name, run in (("uninterrupted", before), ("resumed", after)):
                lines.append(
                    f"    {name:>13} losses, steps {checkpoint + 1}-16: "
                    + " ".join(f"{run[step]:.4f}" for step in range(checkpoint + 1, 17))
                )
    return lines


def measure_accumulation(cache: Path, tmp: Path, **extra) -> str:
    init = tmp / "init"
    if not init.exists():
        from transformers import set_seed

        set_seed(0)
        load_policy(None, "eager", torch.float32, False).save_pretrained(init)
        shutil.copytree(EMBEDDED_TOKENIZER, init, dirs_exist_ok=True)
    weights = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        out = tmp / f"accumulate-{batch}x{accumulation}-{'-'.join(map(str, extra.values())) or 'default'}"
        run_module.train(
            config(
                cache,
                out,
                model=str(init),
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
                optim="sgd",
                learning_rate=1.0,
                lr_scheduler_type="constant",
                weight_decay=0.0,
                max_grad_norm=0.0,
                train_sampling_strategy="sequential",
                **extra,
            )
        )
        weights[batch] = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    start = AutoModelForCausalLM.from_pretrained(str(init)).state_dict()
    difference = max((weights[4][k] - weights[2][k]).abs().max().item() for k in start)
    update = max((weights[4][k] - start[k]).abs().max().item() for k in start)
    label = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in extra.items()) or "default"
    return f"accumulation ({label}): batch 4 x 1 vs batch 2 x 2: max |update diff| {difference:.2e}, largest update {update:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16, help="pairs taken from the bundled sample (default 16)")
    parser.add_argument("--losses", action="store_true", help="also print each step's loss after the resumes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows = SAMPLE.read_text().splitlines()[: args.pairs]
        (tmp / "sample.jsonl").write_text("\n".join(rows) + "\n")
        cache = tmp / "cache"
        preprocess(tmp / "sample.jsonl", cache, progress=False)
        lines = []
        for strategy in ("group_by_length", "random", "sequential"):
            lines += measure_resume(cache, tmp, strategy, args.losses)
        lines.append(measure_accumulation(cache, tmp))
        if any(f.name == "loss_scope" for f in dataclasses.fields(MtdpoConfig)):
            lines.append(measure_accumulation(cache, tmp, loss_scope="micro_batch"))
        print("\n".join(lines))


if __name__ == "__main__":
    main()
