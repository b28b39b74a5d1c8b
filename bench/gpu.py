"""One GPU: mtdpo vs TRL's DPOTrainer, tokens/s and MFU on a Gemma-2-2B-sized random model (2.6B),
bf16, sequences up to 2048 tokens, gradient checkpointing, the same rows and batch for both.

    bash bench/gpu.sh            # on a GPU machine (installs carried wheels from .wheels/ if present)
    python bench/gpu.py --tiny   # a CPU smoke test of the script itself

Each system runs in its own process; MFU uses TRL's FLOP count (3 x forward per trained
token, reference forward not counted) and the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import WORK, StepClock, TokenCounter, cache_for, write_rows  # bench/run.py

GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
)
TINY = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
)


def build_model(tiny: bool):
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, set_seed

    set_seed(0)
    # Gemma-2-2B's sizes on the Gemma architecture: transformers' Gemma2 has no sdpa path (its
    # logit soft-capping needs eager or flash-attn), and both systems must run the same kernels.
    config = GemmaConfig(**(TINY if tiny else GEMMA2_2B), pad_token_id=0, bos_token_id=2, eos_token_id=1)
    device = "cpu" if tiny else "cuda"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32 if tiny else torch.bfloat16, attn_implementation="sdpa"
        )
    return model, config


def common_args(tiny: bool, steps: int, batch: int) -> dict:
    return dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-6,
        bf16=not tiny,
        use_cpu=tiny,
        gradient_checkpointing=not tiny,
        save_strategy="no",
        report_to="none",
        logging_steps=steps,
        disable_tqdm=True,
        beta=0.1,
    )


def worker(
    system: str, tiny: bool, steps: int, batch: int, rows: str, cache: str, sampling: str, layout: str = "padded"
) -> dict:
    import copy

    import torch

    model, config = build_model(tiny)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    clock = StepClock(time.time())
    if system == "mtdpo":
        from mtdpo.cache import open_cache
        from mtdpo.train.attention import SEGMENT_ATTENTION
        from mtdpo.train.config import MtdpoConfig
        from mtdpo.train.data import PairCollator
        from mtdpo.train.plan import make_plan
        from mtdpo.train.trainer import MultiTurnDPOTrainer

        if (
            layout != "padded-sdpa"
        ):  # segment attention: padding never computed, packed/shared rows without a [T, T] mask
            model.set_attn_implementation(SEGMENT_ATTENTION)
            ref.set_attn_implementation(SEGMENT_ATTENTION)
        options = {"padding-free": {"padding_free": True}, "prefix-sharing": {"prefix_sharing": True}}.get(layout, {})
        counter = TokenCounter(PairCollator(0, segments=layout != "padded-sdpa", **options))
        args = MtdpoConfig(
            data=[cache], nll_coef=1.0, train_sampling_strategy=sampling, **common_args(tiny, steps, batch)
        )
        data = open_cache(Path(cache))
        trainer = MultiTurnDPOTrainer(
            model,
            ref,
            args,
            make_plan(args, data, None, model.config),
            train_dataset=data.pairs,
            data_collator=counter,
            callbacks=[clock.callback],
        )
    else:
        import datasets
        from transformers import AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        from mtdpo.assets import EMBEDDED_TOKENIZER

        args = DPOConfig(
            loss_type=["sigmoid", "sft"],
            loss_weights=[1.0, 1.0],
            max_length=None,
            dataset_num_proc=8,
            **common_args(tiny, steps, batch),
        )
        dataset = datasets.load_dataset("json", data_files=rows, split="train", cache_dir=tempfile.mkdtemp())
        tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[clock.callback],
        )
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter
    trainer.train()
    warm = 3
    seconds = clock.times[steps - 1] - clock.times[warm - 1]
    tokens = sum(counter.tokens[warm:steps])
    result = {
        "tokens_per_s": tokens / seconds,
        "mean_seq_len": tokens / (2 * batch * (steps - warm)),
        "steps_timed": steps - warm,
    }
    if not tiny:
        from trl.trainer.utils import compute_flops_per_token, compute_mfu, get_peak_flops

        peak = get_peak_flops(torch.cuda.get_device_name(), "bfloat16")
        flops = compute_flops_per_token(config, int(result["mean_seq_len"]))
        result.update(
            gpu=torch.cuda.get_device_name(),
            peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30,
            mfu_percent=compute_mfu(flops, result["tokens_per_s"], 1, peak) if peak else None,
        )
    return result


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        print(json.dumps(worker(**json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script, not the speed")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--seq", type=int, default=2048, help="longest conversation, tokens")
    parser.add_argument("--sampling", default="group_by_length", help="mtdpo's sampler (random: no length grouping)")
    parser.add_argument(
        "--layout",
        default="prefix-sharing",
        choices=["prefix-sharing", "padding-free", "padded", "padded-sdpa"],
        help="mtdpo's batches (padded-sdpa: transformers' sdpa with a padding mask, the layout before segment attention)",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    seq = 256 if args.tiny else args.seq
    rows = write_rows(WORK / f"gpu-{seq}.jsonl", args.steps * args.batch * 2, seed=5, approx_tokens=int(seq * 0.9))
    cache = cache_for(rows, f"gpu-{seq}", num_proc=2 if args.tiny else 8)
    results = {}
    for system in ("mtdpo", "trl"):
        kwargs = dict(
            system=system,
            tiny=args.tiny,
            steps=args.steps,
            batch=args.batch,
            rows=str(rows),
            cache=str(cache),
            sampling=args.sampling,
            layout=args.layout,
        )
        started = time.time()
        proc = subprocess.run([sys.executable, __file__, "worker", json.dumps(kwargs)], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-5000:], file=sys.stderr)
            raise SystemExit(f"{system} failed")
        results[system] = json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall_s": time.time() - started}
        print(system, results[system], flush=True)
    ratio = results["mtdpo"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"gpu{'-tiny' if args.tiny else ''}{'' if args.sampling == 'group_by_length' else '-' + args.sampling}-{args.layout}.json"
    summary = {
        "ratio": ratio,
        "seq": seq,
        "batch": args.batch,
        "mtdpo_sampling": args.sampling,
        "mtdpo_layout": args.layout,
    }
    (Path(args.out) / name).write_text(json.dumps(results | summary, indent=2) + "\n")
    print(f"mtdpo / TRL tokens/s = {ratio:.2f}")


if __name__ == "__main__":
    main()
