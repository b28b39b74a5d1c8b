"""LoRA vs full fine-tune (and SimPO's reference-free step) on a 26M-parameter Gemma-architecture
model: peak memory and training tokens/s, each run in its own process, the systems interleaved
and repeated; min and median per system, ratios against the full fine-tune of the same session.

    python bench/lora.py                # 3 rounds, ~15 minutes on a busy 2-core machine
    python bench/lora.py --rounds 1     # checks the harness

Every system: the same cache (60 generated multi-turn pairs, ~170-185 tokens a side, the embedded
tokenizer), the same saved starting model, batch 2, fp32 (--bf16 off on every side), 6 optimizer
steps, the first 2 not timed, AdamW.
  full    every weight trains; the reference is a frozen copy of the model (two models in memory)
  lora    LoRA r=16, alpha 32, all linear layers of attention and MLP; the reference is the same
          model with its adapters off
  simpo   every weight trains, --loss-type simpo: no reference model, no reference forward
Memory: the process's peak RSS (imports and loading included), its highest RSS at the end of an
optimizer step, and the bytes of training state it holds (weights of policy and reference,
gradients, optimizer state) counted from the tensors after training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO, RESULTS, WORK, StepClock, TokenCounter, cache_for, current_rss_mb, peak_rss_mb, write_rows  # noqa: E402

MODEL = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=64,
)
SYSTEMS = {
    "full": {},
    "lora": dict(lora_r=16, lora_alpha=32.0),
    "simpo": dict(loss_type="simpo", beta=2.0),
}
STEPS, WARM, BATCH = 6, 2, 2


def base_model() -> Path:
    """The starting model, saved once with the embedded tokenizer (so train's tokenizer check passes)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mtdpo.assets import EMBEDDED_TOKENIZER, TINY_MODEL

    out = WORK / "lora-base"
    if not (out / "model.safetensors").exists():
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(str(TINY_MODEL), **MODEL)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        shutil.copytree(EMBEDDED_TOKENIZER, out, dirs_exist_ok=True)
    return out


def state_bytes(trainer) -> dict:
    """Bytes of the training state: weights (policy + reference), gradients, optimizer state."""

    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    model = trainer.model
    weights = size(model.parameters()) + (size(trainer.ref_model.parameters()) if trainer.ref_model is not None else 0)
    grads = size(p.grad for p in model.parameters() if p.grad is not None)
    optimizer = size(
        v for state in trainer.optimizer.state.values() for v in state.values() if hasattr(v, "numel") and v.dim() > 0
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "weights_mb": weights / 2**20,
        "grads_mb": grads / 2**20,
        "optimizer_mb": optimizer / 2**20,
        "state_mb": (weights + grads + optimizer) / 2**20,
        "trainable_params": trainable,
        "params": sum(p.numel() for p in model.parameters()),
    }


class RssDuringTraining:
    """Resident memory when training starts (models loaded) and its highest value at the end of
    any optimizer step: what training adds, without the imports and loading that precede it."""

    def __init__(self):
        from transformers import TrainerCallback

        sampler = self
        self.at_start, self.highest = 0.0, 0.0

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                sampler.at_start = current_rss_mb()

            def on_step_end(self, args, state, control, **kwargs):
                sampler.highest = max(sampler.highest, current_rss_mb())

        self.callback = _Callback()


def worker(system: str, cache: str, model: str) -> dict:
    import mtdpo.train.run as run
    from mtdpo.train.config import MtdpoConfig

    clock, counters, original = StepClock(time.time()), [], run.PairCollator

    def counting_collator(*args, **kwargs):
        counters.append(TokenCounter(original(*args, **kwargs)))
        return counters[-1]

    run.PairCollator = counting_collator
    config = MtdpoConfig(
        data=[cache],
        model=model,
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        save_strategy="no",
        report_to="none",
        logging_steps=STEPS,
        learning_rate=1e-5,
        **SYSTEMS[system],
    )
    rss = RssDuringTraining()
    trainer = run.train(config, callbacks=[clock.callback, rss.callback])
    seconds = clock.times[STEPS - 1] - clock.times[WARM - 1]
    tokens = sum(counters[0].tokens[WARM:STEPS])
    return {
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_train_start_mb": rss.at_start,
        "rss_training_max_mb": rss.highest,
        **state_bytes(trainer),
    }


def run_worker(system: str, **kwargs) -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, __file__, "worker", system, json.dumps(kwargs)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"  {system}: {result['tokens_per_s']:,.0f} tok/s, peak RSS {result['peak_rss_mb']:,.0f} MB, RSS in training "
        f"{result['rss_training_max_mb']:,.0f} MB (from {result['rss_train_start_mb']:,.0f}), state {result['state_mb']:,.0f} MB",
        flush=True,
    )
    return result


def summary(runs: dict[str, list[dict]]) -> str:
    def stat(system, key, how):
        return how(r[key] for r in runs[system])

    lines = [
        "| system | tokens/s min / median | × full (median) | peak RSS MB min / median | × full | max RSS in training MB, median | × full | training state MB | × full | trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    median = lambda values: statistics.median(list(values))  # noqa: E731
    for system in runs:
        tps, rss, held, state = (
            stat(system, k, median) for k in ("tokens_per_s", "peak_rss_mb", "rss_training_max_mb", "state_mb")
        )
        lines.append(
            f"| {system} | {stat(system, 'tokens_per_s', min):,.0f} / {tps:,.0f} | {tps / stat('full', 'tokens_per_s', median):.2f} "
            f"| {stat(system, 'peak_rss_mb', min):,.0f} / {rss:,.0f} | {rss / stat('full', 'peak_rss_mb', median):.2f} "
            f"| {held:,.0f} | {held / stat('full', 'rss_training_max_mb', median):.2f} | {state:,.0f} | {state / stat('full', 'state_mb', median):.3f} | {runs[system][0]['trainable_params']:,} of {runs[system][0]['params']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        print(json.dumps(worker(sys.argv[2], **json.loads(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="times each system runs (interleaved)")
    args = parser.parse_args()
    cache = cache_for(write_rows(WORK / "lora-rows.jsonl", 60, seed=4), "lora-rows")
    model = base_model()
    runs: dict[str, list[dict]] = {system: [] for system in SYSTEMS}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        for system in SYSTEMS:
            runs[system].append(run_worker(system, cache=str(cache), model=str(model)))
    table = summary(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "lora" if args.rounds >= 3 else "lora-quick"
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"model": MODEL, "steps": STEPS, "batch": BATCH, "runs": runs}, indent=2) + "\n"
    )
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
