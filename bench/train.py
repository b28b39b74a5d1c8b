"""Training tokens/s, like with like: mtdpo padded, mtdpo padding-free, mtdpo prefix-sharing and
TRL's DPOTrainer, side by side on this machine.

    python bench/train.py            # ~1k and ~2k tokens, 2 repeats (~25 CPU-minutes; hours of wall time on busy cores)
    python bench/train.py --quick    # tiny model and lengths: checks the harness in a few minutes
    python bench/train.py --lengths 2048 --repeats 1 --name train-2k   # one length, one repeat
    python bench/train.py --table bench/results/train-1k.json bench/results/train-2k.json   # tables of saved runs
    python bench/train.py --kto      # KTO beside DPO at equal tokens (mtdpo only; see benchmark_kto)
    python bench/train.py --groups   # prefix forest (issue 33): --rule all pairs, 16 per problem, vs sharing, padded, TRL
    python bench/train.py --contexts # prefix forest on Qwen3 multi-context sides vs the rows rendered prefix-stable
    python bench/train.py --pairs    # prefix forest on single pairs at ~1k tokens vs sharing and padded

Both systems: the same rows (multi-turn pairs whose shared prompt spans earlier assistant and
tool turns), tokenizer (the embedded one), model (a 25M-parameter Gemma-architecture model,
random, the same weights from disk), batch (4 pairs), precision (--bf16/--no-bf16, default: what
mtdpo picks on this machine), objective (DPO sigmoid + NLL, TRL: loss_type ["sigmoid", "sft"]) and
reference handling (a live frozen copy). Each measurement runs in its own process; the systems
are interleaved and the order rotates at every repeat; min and median over repeats are reported.
Tokens/s counts the real tokens of both sequences of every pair (what TRL's attention mask
counts), the same number in every mtdpo layout.
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

from run import REPO, WORK, TokenCounter, cache_for, count_mtdpo_tokens, peak_rss_mb  # bench/run.py

RESULTS = REPO / "bench" / "results"
# Gemma's architecture (MQA, GeGLU, RMSNorm, tied embeddings) at 25M parameters, on the embedded 2,048-token vocabulary.
GEMMA_25M = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=7,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=64,
)
GEMMA_TINY = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
)
MTDPO_MODES = {
    "mtdpo padded": {"prefix_sharing": False, "padding_free": False},
    "mtdpo padding-free": {"prefix_sharing": False, "padding_free": True},
    "mtdpo prefix-sharing": {"prefix_sharing": True, "padding_free": False},
}
SYSTEMS = [*MTDPO_MODES, "TRL"]


# ── data and model ────────────────────────────────────────────────────────────


def write_multiturn_rows(
    path: Path, n: int, approx_tokens: int, shared_fraction: float = 0.5, seed: int = 7, prompt_tokens: int = 0
) -> Path:
    """n pairs from `mtdpo.synthetic.make_pairs` whose shared prompt holds an earlier assistant
    turn and its tool output: that shared tool output is lengthened identically on both sides to
    about `shared_fraction` of `approx_tokens`, and each side's own tool outputs to the rest
    (so each conversation has roughly 0.8-1.0 x approx_tokens tokens: the embedded tokenizer
    splits the filler's numbers finely, about 2 characters a token). `prompt_tokens`: about as
    many more in the first message (a long system prompt, such as tool definitions), the same
    for both sides."""
    import random

    from mtdpo.synthetic import make_pairs

    if path.exists():
        return path
    rng, rows = random.Random(seed), []
    for row in make_pairs(8 * n, seed=seed):
        shared = next(i for i, (a, b) in enumerate(zip(row["chosen"], row["rejected"])) if a != b)
        prompt = row["chosen"][:shared]
        if not any(m["role"] == "tool" for m in prompt):
            continue
        size = 2 * approx_tokens * rng.uniform(0.8, 1.0)  # characters
        tool = max(i for i, m in enumerate(prompt) if m["role"] == "tool")
        text = _filler(int(size * shared_fraction), rng.randrange(1000))
        head = _filler(2 * prompt_tokens, rng.randrange(1000)) if prompt_tokens else ""
        for side in ("chosen", "rejected"):
            if head:
                row[side][0] = {**row[side][0], "content": head + "\n" + row[side][0]["content"]}
            row[side][tool] = {**row[side][tool], "content": row[side][tool]["content"] + "\n" + text}
            own = [m for m in row[side][shared:] if m["role"] == "tool"] or [row[side][-1]]
            for message in own:
                message["content"] += "\n" + _filler(int(size * (1 - shared_fraction)) // len(own), rng.randrange(1000))
        rows.append(row)
        if len(rows) == n:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _filler(chars: int, start: int) -> str:
    lines = [f"step {k}: value {k * 37 % 101} ok" for k in range(start, start + chars // 16 + 2)]
    return "\n".join(lines)[:chars]


def model_dir(tiny: bool, vocab: int | None = None) -> Path:
    """The random model both systems load (same weights), written once; `vocab`: for a tokenizer
    with more tokens than the embedded one (its added special tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, set_seed

    sizes = {**(GEMMA_TINY if tiny else GEMMA_25M), **({"vocab_size": vocab} if vocab else {})}
    out = WORK / (("gemma-tiny" if tiny else "gemma-25m") + (f"-vocab{vocab}" if vocab else ""))
    if not (out / "config.json").exists():
        set_seed(0)
        config = GemmaConfig(**sizes, pad_token_id=0, bos_token_id=2, eos_token_id=1)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


# ── workers (each in a fresh process) ─────────────────────────────────────────


class StepClock:
    """Trainer callback: wall and process CPU time at each optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        self.wall: list[float] = []
        self.cpu: list[float] = []
        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.wall.append(time.perf_counter())
                clock.cpu.append(time.process_time())

        self.callback = Callback()


def worker(
    system: str,
    model: str,
    rows: str,
    cache: str,
    steps: int,
    batch: int,
    bf16: bool,
    warm: int,
    mode: dict | None = None,
) -> dict:
    """One measurement; `mode`: MtdpoConfig options of an mtdpo system (default: MTDPO_MODES[system])."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    clock = StepClock()
    losses: list[float] = []
    if system == "TRL":
        counter = _train_trl(model, rows, steps, batch, bf16, clock, losses)
    elif system in KTO_SYSTEMS:
        counter = _train_mtdpo_kto(KTO_SYSTEMS[system], model, cache, steps, batch, bf16, clock, losses)
    else:
        counter = _train_mtdpo(mode or MTDPO_MODES[system], model, cache, steps, batch, bf16, clock, losses)
    timed = sum(counter.tokens[warm:steps])
    pairs = sum(counter.pairs[warm:steps])
    wall, cpu = clock.wall[steps - 1] - clock.wall[warm - 1], clock.cpu[steps - 1] - clock.cpu[warm - 1]
    return {
        "tokens_per_s": timed / wall,
        "tokens_per_cpu_s": timed / cpu,
        "pairs_per_s": pairs / wall,
        "pairs_per_cpu_s": pairs / cpu,
        "pairs_timed": pairs,
        "row_tokens_per_pair": sum(counter.row_tokens[warm:steps]) / pairs,  # what the model computes (mtdpo)
        "steps_timed": steps - warm,
        "mean_seq_len": timed / (2 * batch * (steps - warm)),
        "threads": torch.get_num_threads(),
        "step_wall_s": [b - a for a, b in zip(clock.wall[warm - 1 : steps - 1], clock.wall[warm:steps])],
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        # KTO: tokens of the KL sequences the policy also forwarded (without gradient) in the timed steps
        "kl_tokens": sum(getattr(counter, "kl_tokens", [])[warm:steps]),
    }


class _LossLog:
    def __init__(self, losses):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    losses.append(logs["loss"])

        self.callback = Callback()


def _train_mtdpo(mode: dict, model: str, cache: str, steps: int, batch: int, bf16: bool, clock, losses) -> TokenCounter:
    import mtdpo.train.run as run
    from mtdpo.train.config import MtdpoConfig

    counters = count_mtdpo_tokens()
    config = MtdpoConfig(
        data=[cache],
        model=model,
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        max_steps=steps,
        bf16=bf16,
        per_device_train_batch_size=batch,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        learning_rate=1e-6,
        beta=0.1,
        nll_coef=1.0,
        **mode,
    )
    run.train(config, callbacks=[clock.callback, _LossLog(losses).callback])
    return counters[0]


def _train_trl(model: str, rows: str, steps: int, batch: int, bf16: bool, clock, losses) -> TokenCounter:
    import copy

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from mtdpo.assets import EMBEDDED_TOKENIZER

    datasets.disable_progress_bars()
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)  # live reference, as mtdpo's
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=bf16,
        report_to="none",
        max_length=None,
        save_strategy="no",
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 1.0],
        beta=0.1,
        learning_rate=1e-6,
        per_device_train_batch_size=batch,
        max_steps=steps,
        logging_steps=1,
        dataset_num_proc=None,
        disable_tqdm=True,
    )
    dataset = datasets.load_dataset("json", data_files=rows, split="train", cache_dir=tempfile.mkdtemp())
    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[clock.callback, _LossLog(losses).callback],
    )
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    return counter


def run_worker(threads: int, **kwargs) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "BENCH_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, __file__, "worker", json.dumps(kwargs)], env=env, cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kwargs['system']} failed:\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    result["start_line"] = next((line for line in lines if line.startswith("precision:")), None)
    return result


# ── the benchmark ─────────────────────────────────────────────────────────────


def cache_stats(cache: Path) -> dict:
    """Token counts of the cache: what a padded batch computes vs a prefix-shared one."""
    from mtdpo.cache import open_cache

    columns = open_cache(cache).dataset.with_format("numpy", columns=["prompt_len", "chosen_len", "rejected_len"])[:]
    both = int(columns["chosen_len"].sum() + columns["rejected_len"].sum())
    prompt = int(columns["prompt_len"].sum())
    return {
        "pairs": len(columns["prompt_len"]),
        "mean_seq_len": both / (2 * len(columns["prompt_len"])),
        "prompt_share": 2 * prompt / both,
        "shared_tokens_saved": (prompt - len(columns["prompt_len"])) / both,
    }


def token_rates(result: dict) -> str:
    """A worker's progress line: its tokens per CPU-second and per wall second."""
    return f"{result['tokens_per_cpu_s']:8.1f} tok/CPU-s, {result['tokens_per_s']:8.1f} tok/s wall"


def interleaved(systems: list[str], repeats: int, parallel: int, run, line) -> dict[str, list[dict]]:
    """Each system once per repeat, `parallel` worker processes at a time, the order rotated at
    every repeat (who goes first); `run(system)` gives a worker's result, timed here (`wall_s`),
    `line(result)` what its progress line says. Returns the results of each system, by repeat."""
    from concurrent.futures import ThreadPoolExecutor

    runs = {system: [] for system in systems}
    for repeat in range(repeats):
        order = systems[repeat % len(systems) :] + systems[: repeat % len(systems)]

        def measure(system, repeat=repeat):
            started = time.time()
            result = run(system)
            result["wall_s"] = time.time() - started
            print(f"  {system:32s} repeat {repeat}: {line(result)}  ({result['wall_s']:.0f} s)", flush=True)
            return result

        with ThreadPoolExecutor(parallel) as pool:
            for system, result in zip(order, pool.map(measure, order)):
                runs[system].append(result)
    return runs


def benchmark(
    quick: bool, bf16: bool, repeats: int, threads: int, parallel: int, lengths: tuple[int, ...] | None = None
) -> dict:

    lengths = lengths or ((256, 512) if quick else (1024, 2048))
    steps, warm, batch = (
        (4, 1, 4) if quick else (2, 1, 4)
    )  # full: 1 timed step (CPU time varies little), to fit ~20 minutes
    model = model_dir(quick)
    results = {
        "machine": _machine(),
        "quick": quick,
        "bf16": bf16,
        "batch": batch,
        "steps": steps,
        "warm": warm,
        "repeats": repeats,
        "threads": threads,
        "parallel": parallel,
        "model": {**(GEMMA_TINY if quick else GEMMA_25M), "parameters": _parameters(model)},
        "lengths": {},
    }
    for length in lengths:
        rows = write_multiturn_rows(WORK / f"train-mt-{length}.jsonl", 4 * batch * steps, approx_tokens=length)
        cache = cache_for(rows, f"train-mt-{length}")
        entry = results["lengths"][str(length)] = {"data": cache_stats(cache), "runs": {}}
        print(f"~{length} tokens: {entry['data']}", flush=True)
        runs = entry["runs"] = interleaved(
            SYSTEMS,
            repeats,
            parallel,
            lambda system, rows=rows, cache=cache: run_worker(
                threads,
                system=system,
                model=str(model),
                rows=str(rows),
                cache=str(cache),
                steps=steps,
                batch=batch,
                bf16=bf16,
                warm=warm,
            ),  # fmt: skip
            token_rates,
        )
        entry["summary"] = summarise(runs)
        # the same batches in the three mtdpo layouts: their losses must agree (bf16: to rounding)
        first = runs["mtdpo padded"][0]["losses"]
        entry["max_loss_diff_vs_padded"] = {
            system: max(abs(a - b) for a, b in zip(first, runs[system][0]["losses"]))
            for system in MTDPO_MODES
            if system != "mtdpo padded"
        }
    return results


def _parameters(model: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())


def _machine() -> dict:
    import platform

    import torch
    import transformers
    import trl

    from mtdpo.train.config import cpu_has_bf16_matmul

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "bf16_flag": cpu_has_bf16_matmul(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_before": os.getloadavg(),
    }


def table(results: dict, key: str = "tokens_per_cpu_s") -> str:
    """Markdown: one row per length, tokens per CPU-second (median, min) of each system and the ratios."""
    precision = "bf16" if results["bf16"] else "fp32"
    lines = [
        f"| tokens per sequence (mean) | prompt share | {' | '.join(SYSTEMS)} | prefix-sharing / TRL | padded / TRL | prefix-sharing / padded | padding-free / padded |",
        "|---|---:|" + "---:|" * (len(SYSTEMS) + 4),
    ]
    for length, entry in results["lengths"].items():
        summary = {system: values[key] for system, values in entry["summary"].items()}

        def ratio(a, b, summary=summary):
            return (
                f"{summary[a]['median'] / summary[b]['median']:.2f}× (min {summary[a]['min'] / summary[b]['min']:.2f}×)"
            )

        cells = [f"{summary[s]['median']:,.0f} ({summary[s]['min']:,.0f})" for s in SYSTEMS]
        lines.append(
            f"| ~{length} ({entry['data']['mean_seq_len']:,.0f}) | {entry['data']['prompt_share']:.0%} | {' | '.join(cells)} | "
            f"{ratio('mtdpo prefix-sharing', 'TRL')} | {ratio('mtdpo padded', 'TRL')} | {ratio('mtdpo prefix-sharing', 'mtdpo padded')} | "
            f"{ratio('mtdpo padding-free', 'mtdpo padded')} |"
        )
    unit = "Tokens per CPU-second" if key == "tokens_per_cpu_s" else "Tokens per wall-clock second"
    lines += [
        "",
        f"{unit}, median (min) of {results['repeats']} runs each, {results['threads']} thread(s) per process, "
        f"{results['parallel']} processes at a time, {precision}, "
        f"batch {results['batch']} pairs, {results['steps'] - results['warm']} timed step(s) after {results['warm']} warm-up step; "
        f"{results['model']['parameters'] / 1e6:.1f}M parameters. Load average {results['machine']['load_before'][0]:.1f} before, "
        f"{results['machine'].get('load_after', [float('nan')])[0]:.1f} after.",
    ]
    diffs = {
        length: {s: f"{d:.1e}" for s, d in entry["max_loss_diff_vs_padded"].items()}
        for length, entry in results["lengths"].items()
    }
    lines.append(
        f"Largest |loss difference| from padded, same batches, over the logged steps: {json.dumps(diffs, ensure_ascii=False)}"
    )
    return "\n".join(lines) + "\n"


def merged_results(paths: list[str]) -> dict:
    """Several saved runs as one: their lengths side by side, the runs of a length made twice pooled."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    merged = {**parts[0], "lengths": {}}
    for part in parts:
        for length, entry in part["lengths"].items():
            if length in merged["lengths"]:
                for system, runs in entry["runs"].items():
                    merged["lengths"][length]["runs"][system] += runs
            else:
                merged["lengths"][length] = json.loads(json.dumps(entry))
    repeats = set()
    for entry in merged["lengths"].values():
        entry["summary"] = summarise(entry["runs"])
        repeats.add(len(entry["runs"]["TRL"]))
    merged["repeats"] = "/".join(str(n) for n in sorted(repeats))
    return merged


def summarise(runs: dict) -> dict:
    keys = ("tokens_per_cpu_s", "tokens_per_s", "pairs_per_cpu_s", "pairs_per_s", "peak_rss_mb")
    return {
        system: {
            k: {
                "min": min(r[k] for r in rs),
                "median": statistics.median(r[k] for r in rs),
                "max": max(r[k] for r in rs),
            }
            for k in keys
            if all(k in r for r in rs)  # results saved before pairs were counted have tokens only
        }
        for system, rs in runs.items()
    }


# ── KTO beside DPO at equal tokens ────────────────────────────────────────────
#
# The same sequences, as many per step: DPO trains B pairs per step, KTO the 2B rows they make
# (each pair's chosen conversation as a desirable row, its rejected one as an undesirable row),
# both read in the cache's order (sequential sampling), so KTO's step k holds exactly the sequences
# of DPO's step k. Tokens/s counts those sequences' tokens in both (for KTO what TRL's KTOTrainer
# counts: the rows, not their KL sequences). Both padded (segment attention), both the same
# precision. KTO does more per token: besides the rows' forward and backward and their reference
# forward (DPO's work on its pairs), the policy's and the reference's forwards of the KL sequences
# (without gradient; each continues its row's prompt, so only the partner's completion and one
# prompt token are forwarded, and one that is a row of the batch is not forwarded at all). With a
# stored reference (precompute-ref, both objectives) what remains extra is the policy's KL forward.
#
# "whole KL sequences": the same run forwarding each KL sequence whole, prompt included (what
# mtdpo did before the continuations, and what TRL does), for the gain of continuing the prompts.
#
# Which KL sequences are rows depends on the row order (TRL's partner is the previous row): with
# each pair's two rows adjacent ("neighbours of one problem", as `mtdpo pairs --kto` writes them)
# half of them are; with the B chosen rows of a step first, then its B rejected ones ("neighbours
# of other problems", the same sequences per step) none is. `work` below counts
# forward-equivalents per step (a forward and backward = 3) from the tokens each system
# processed, so `tok/s x work` compares the implementations once the objectives' different
# amounts of work are taken out.

KTO_SYSTEMS = {
    "DPO padded": {"objective": "dpo", "stored": False},
    "KTO padded": {"objective": "kto", "stored": False, "order": "problem"},
    "KTO padded, other-problem neighbours": {"objective": "kto", "stored": False, "order": "mixed"},
    "KTO padded, other-problem neighbours, whole KL sequences": {
        "objective": "kto",
        "stored": False,
        "order": "mixed",
        "whole_kl": True,
    },
    "DPO padded, stored reference": {"objective": "dpo", "stored": True},
    "KTO padded, stored reference": {"objective": "kto", "stored": True, "order": "problem"},
    "KTO padded, other-problem neighbours, stored reference": {"objective": "kto", "stored": True, "order": "mixed"},
    "KTO padded, other-problem neighbours, whole KL sequences, stored reference": {
        "objective": "kto",
        "stored": True,
        "order": "mixed",
        "whole_kl": True,
    },
}


def dpo_peer(system: str) -> str:
    """The DPO system a KTO system is compared with: the one with the same reference handling."""
    stored = KTO_SYSTEMS[system]["stored"]
    return next(name for name, mode in KTO_SYSTEMS.items() if mode["objective"] == "dpo" and mode["stored"] == stored)


class KtoTokenCounter(TokenCounter):
    """TokenCounter (the rows' tokens) that also counts the KL sequences' real tokens."""

    def __init__(self, collator):
        super().__init__(collator)
        self.kl_tokens = []

    def __call__(self, examples):
        batch = super().__call__(examples)
        kl = batch.get("kl")
        # padded whole KL sequences, or packed ones or continuations of the rows' prompts (no padding)
        tokens = 0 if kl is None else kl["attention_mask"].sum() if "attention_mask" in kl else kl["input_ids"].numel()
        self.kl_tokens.append(int(tokens))
        return batch


def _train_mtdpo_kto(mode: dict, model: str, cache: str, steps: int, batch: int, bf16: bool, clock, losses):
    """One of KTO_SYSTEMS: `batch` pairs per step for DPO, their 2 x batch rows for KTO."""
    import mtdpo.train.run as run
    from mtdpo.train.config import MtdpoConfig

    kto = mode["objective"] == "kto"
    if kto:
        counters, original = [], run.kto_run_parts

        def counting(*args, **kwargs):
            parts = original(*args, **kwargs)
            parts["collator"].continue_prompts = not mode.get("whole_kl", False)
            counters.append(KtoTokenCounter(parts["collator"]))
            parts["collator"] = counters[-1]
            return parts

        run.kto_run_parts = counting
    else:
        counters = count_mtdpo_tokens()
    config = MtdpoConfig(
        data=[cache],
        model=model,
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        max_steps=steps,
        bf16=bf16,
        per_device_train_batch_size=2 * batch if kto else batch,
        train_sampling_strategy="sequential",
        prefix_sharing=False,
        padding_free=False,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        learning_rate=1e-6,
        beta=0.1,
        loss_type="kto" if kto else "sigmoid",
        nll_coef=0.0 if kto else 1.0,  # each objective's default
    )
    run.train(config, callbacks=[clock.callback, _LossLog(losses).callback])
    return counters[0]


def kto_rows_of(pairs: Path, out: Path, order: str, batch: int) -> Path:
    """Each pair's chosen conversation (desirable) and its rejected one (undesirable): "problem",
    the two adjacent; "mixed", per block of `batch` pairs (a DPO step) the chosen ones, then the
    rejected ones, so that no row's previous row answers its problem."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    unpaired = []
    for start in range(0, len(rows), batch if order == "mixed" else 1):
        block = rows[start : start + (batch if order == "mixed" else 1)]
        unpaired += [{"messages": r[side], "label": side == "chosen"} for side in ("chosen", "rejected") for r in block]
    out.write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    return out


def stored_reference_copy(cache: Path, model: Path, bf16: bool, batch: int) -> Path:
    """A copy of `cache` with the reference's log-probs stored, computed as the run computes them."""
    import shutil

    from mtdpo.train.config import MtdpoConfig
    from mtdpo.train.reference import precompute_reference

    out = cache.with_name(cache.name + ("-ref-bf16" if bf16 else "-ref-fp32"))
    if not (out / "reference").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(cache, out)
        config = MtdpoConfig(
            data=[str(out)],
            model=str(model),
            use_cpu=True,
            bf16=bf16,
            prefix_sharing=False,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=batch,
        )
        precompute_reference(config, progress=False)
    return out


def benchmark_kto(quick: bool, bf16: bool, repeats: int, threads: int, parallel: int, lengths=None) -> dict:

    lengths = lengths or ((256,) if quick else (1024,))
    steps, warm, batch = (4, 1, 2) if quick else (3, 1, 2)  # batch: pairs (DPO), twice as many rows (KTO)
    model = model_dir(quick)
    results = {
        "kind": "kto-vs-dpo",
        "machine": _machine(),
        "quick": quick,
        "bf16": bf16,
        "batch_pairs": batch,
        "steps": steps,
        "warm": warm,
        "repeats": repeats,
        "threads": threads,
        "parallel": parallel,
        "model": {**(GEMMA_TINY if quick else GEMMA_25M), "parameters": _parameters(model)},
        "lengths": {},
    }
    # each length as is, and the last one again with half its tokens in a long first message
    shapes = [(length, 0) for length in lengths] + [(lengths[-1], lengths[-1] // 2)]
    for length, prompt_tokens in shapes:
        # the long-prompt shape: the neighbours' order only matters to which KL sequences are rows
        systems = [s for s, mode in KTO_SYSTEMS.items() if not prompt_tokens or mode.get("order") != "problem"]
        n, name = batch * steps, f"{length}" + (f"-prompt{prompt_tokens}" if prompt_tokens else "")
        pairs = write_multiturn_rows(
            WORK / f"kto-bench-pairs-{name}-{n}.jsonl",
            n,
            approx_tokens=length - prompt_tokens,
            prompt_tokens=prompt_tokens,
        )
        dpo_cache = cache_for(pairs, f"kto-bench-dpo-{name}-{n}")
        kto_caches = {
            order: cache_for(
                kto_rows_of(pairs, WORK / f"kto-bench-rows-{order}-{name}-{n}.jsonl", order, batch),
                f"kto-bench-kto-{order}-{name}-{n}",
            )
            for order in ("problem", "mixed")
        }
        caches = {}
        for system in systems:
            mode = KTO_SYSTEMS[system]
            cache = dpo_cache if mode["objective"] == "dpo" else kto_caches[mode["order"]]
            rows = batch if mode["objective"] == "dpo" else 2 * batch
            caches[system] = stored_reference_copy(cache, model, bf16, rows) if mode["stored"] else cache
        data = {**cache_stats(dpo_cache), "kto_prompt_share": kto_prompt_share(kto_caches["mixed"])}
        entry = results["lengths"][name] = {"data": data, "prompt_tokens": prompt_tokens, "runs": {}}
        print(f"~{length} tokens ({prompt_tokens} in the first message): {entry['data']}", flush=True)
        runs = entry["runs"] = interleaved(
            systems,
            repeats,
            parallel,
            lambda system, caches=caches: run_worker(
                threads,
                system=system,
                model=str(model),
                rows="",
                cache=str(caches[system]),
                steps=steps,
                batch=batch,
                bf16=bf16,
                warm=warm,
            ),  # fmt: skip
            token_rates,
        )
        entry["summary"] = summarise(runs)
        entry["work"] = kto_work(runs)
    return results


def kto_prompt_share(cache: Path) -> float:
    """The share of a KTO cache's tokens before each row's first trained token (its prompt)."""
    from mtdpo.cache import open_cache

    data = open_cache(cache)
    records = [data.record(i) for i in range(len(data))]
    return sum(r.prompt_len for r in records) / sum(len(r.sequence) for r in records)


def kto_work(runs: dict) -> dict:
    """Forward-equivalents per timed token of each system (forward + backward = 3): DPO 3 + 1
    (its reference) per token, KTO the same on its rows plus 2 per KL token (the policy's and the
    reference's forwards), 1 with a stored reference; from the tokens the first run processed."""
    work = {}
    for system, results in runs.items():
        tokens = results[0]["tokens_per_s"] * sum(results[0]["step_wall_s"])  # the timed tokens
        kl = results[0]["kl_tokens"] / tokens if tokens else 0.0
        stored = KTO_SYSTEMS[system]["stored"]
        work[system] = (3 if stored else 4) + kl * (1 if stored else 2)
    return work


def kto_table(results: dict, key: str = "tokens_per_cpu_s") -> str:
    precision = "bf16" if results["bf16"] else "fp32"
    lines = [
        "| tokens per sequence (mean) | system | tokens/s median (min) | KTO / DPO | work per token | KTO / DPO x work ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for length, entry in results["lengths"].items():
        summary, work = entry["summary"], entry["work"]
        prompt = entry.get("prompt_tokens", 0)
        label = f"~{length.split('-')[0]} ({entry['data']['mean_seq_len']:,.0f})" + (
            f", ~{prompt} of them a long first message" if prompt else ""
        )
        for system in [s for s in KTO_SYSTEMS if s in summary]:
            values = summary[system][key]
            cells = [
                label,
                system,
                f"{values['median']:,.0f} ({values['min']:,.0f})",
            ]
            if KTO_SYSTEMS[system]["objective"] == "kto":
                dpo = dpo_peer(system)
                ratio = values["median"] / summary[dpo][key]["median"]
                low = values["min"] / summary[dpo][key]["min"]
                cells += [
                    f"{ratio:.2f}× (min {low:.2f}×)",
                    f"{work[system]:.2f}",
                    f"{ratio * work[system] / work[dpo]:.2f}×",
                ]
            else:
                cells += ["", f"{work[system]:.2f}", ""]
            lines.append("| " + " | ".join(cells) + " |")
    unit = "Tokens per CPU-second" if key == "tokens_per_cpu_s" else "Tokens per wall-clock second"
    lines += [
        "",
        f"{unit} of the trained sequences (DPO: both sides of each pair; KTO: the rows, the same sequences), median (min) "
        f"of {results['repeats']} runs each, interleaved, {results['threads']} thread(s) per process, {results['parallel']} "
        f"processes at a time, {precision} on both, {results['batch_pairs']} pairs (DPO) or {2 * results['batch_pairs']} rows "
        f"(KTO) per step, {results['steps'] - results['warm']} timed step(s) after {results['warm']} warm-up; "
        f"{results['model']['parameters'] / 1e6:.1f}M parameters. Work: forward-equivalents per token (see benchmark_kto).",
    ]
    return "\n".join(lines) + "\n"


# ── prefix forest scenarios (issue 33) ────────────────────────────────────────
#
# Each scenario runs a few systems (an mtdpo layout on a cache, or TRL on the rows), each in its own
# process, interleaved and rotated like `benchmark`, at one precision (fp32 unless --bf16, set
# explicitly on both sides). Tokens of pairs per second count both sequences of every pair (for a
# side of several sequences: all of them), the same number in every mtdpo layout of one cache;
# pairs per second compare one set of conversations rendered two ways (scenario "contexts").
# "row tokens per pair" is what the model computes: the rows' input_ids, padding included.

PADDED = {"prefix_sharing": False, "padding_free": False}
SHARING = {"prefix_sharing": True}
FOREST = {"prefix_forest": True, "group_by_prompt": False}  # the same length-grouped batches as the others
FOREST_GROUPS = {"prefix_forest": True, "group_by_prompt": True}  # a problem's pairs in one micro-batch
# The pairs in the cache's order: `mtdpo pairs` writes a problem's pairs together, so micro-batches of
# 16 are whole problems. What group-by-prompt should give; it splits a problem whose pairs have
# different prompt_len (two trajectories that open with the same turn share more than the prompt).
FOREST_CACHE_ORDER = {"prefix_forest": True, "group_by_prompt": False, "train_sampling_strategy": "sequential"}

# Plans of `mtdpo.synthetic` that `mtdpo pairs`' default filters keep (code in every turn before the
# answer, no error in the last tool output): 4 correct and 4 incorrect, so each problem's
# trajectories are distinct and `--rule all` makes 16 pairs of it.
CORRECT_PLANS = [
    ["code", "final"],
    ["code", "verify", "final"],
    ["err", "code", "final"],
    ["err", "code", "verify", "final"],
]
WRONG_PLANS = [["bad", "wfinal"], ["code", "wfinal"], ["bad", "bverify", "wfinal"], ["err", "bad", "wfinal"]]


def write_group_rollouts(path: Path, problems: int, prompt_tokens: int, tool_tokens: int, seed: int = 0) -> Path:
    """Graded rollouts, 4 correct and 4 incorrect trajectories per problem: the problem's user turn
    lengthened by about `prompt_tokens` (a data listing all its trajectories share), each tool
    output by about `tool_tokens` (~2 characters a token). A tool output depends only on the
    conversation before it, as a real tool's does: trajectories that begin with the same code
    share its output, so they part at an assistant turn."""
    import random
    import zlib

    from mtdpo.synthetic import SYSTEMS, USER_SUFFIX, _problem, _steps

    if path.exists():
        return path
    r, rows = random.Random(seed), []
    for k in range(problems):
        p = _problem(r)
        user = p["q"] + USER_SUFFIX + "\n\nData:\n" + _filler(2 * prompt_tokens, r.randrange(1000))
        prompt = [{"role": "system", "content": r.choice(SYSTEMS)}, {"role": "user", "content": user}]
        for plan, reward in [*((q, 1.0) for q in CORRECT_PLANS), *((q, 0.0) for q in WRONG_PLANS)]:
            messages = prompt + _steps(r, p, plan)
            for at, message in enumerate(messages):
                if message["role"] == "tool":
                    before = zlib.crc32(json.dumps(messages[:at]).encode()) % 100_000
                    message["content"] += "\n" + _filler(2 * tool_tokens, before)
            rows.append({"prompt_id": f"problem-{k:05d}", "messages": messages, "reward": reward, "gt": p["ans"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def group_pairs(rollouts: Path) -> Path:
    """`mtdpo pairs --rule all` on the rollouts: every correct x incorrect pair of each problem."""
    from mtdpo.pairs import PairOptions, make_pairs_file

    out = rollouts.with_suffix(".pairs.jsonl")
    if not out.exists():
        make_pairs_file(rollouts, out, PairOptions(rule="all"))
    return out


def write_context_rows(path: Path, n: int, approx_tokens: int, turns: int = 3, seed: int = 0) -> Path:
    """n Qwen3-style pairs of `turns` answers with reasoning, each after a question (a document
    of ~30% of `approx_tokens` in the first): per turn ~60%/turns in reasoning, ~10%/turns in the
    answer (~2 characters a token). The sides differ from the first answer on. Qwen3's template
    drops an answered turn's reasoning from the history, so each turn is scored in its own
    context: a side of `turns` sequences."""
    import random

    if path.exists():
        return path
    r, rows = random.Random(seed), []
    chars = 2 * approx_tokens

    def side() -> list[dict]:
        messages = []
        for turn in range(turns):
            if turn:
                messages.append({"role": "user", "content": f"And what does step {r.randrange(1000)} give?"})
            answer = f"It gives {r.randrange(1000)}.\n" + _filler(int(0.1 * chars / turns), r.randrange(100_000))
            thought = _filler(int(0.6 * chars / turns), r.randrange(100_000))
            messages.append({"role": "assistant", "content": answer, "reasoning_content": thought})
        return messages

    for k in range(n):
        question = f"Read the log below. Which value does step {k} give?\n" + _filler(
            int(0.3 * chars), r.randrange(1000)
        )
        prompt = [{"role": "user", "content": question}]
        rows.append({"chosen": prompt + side(), "rejected": prompt + side()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


QWEN3_DROPS_REASONING = "{%- if loop.index0 > ns.last_query_index %}"  # reasoning only after the last question


def qwen3_tokenizers() -> dict[str, Path]:
    """The tests' Qwen3 tokenizer (the embedded BPE, Qwen3's special tokens and template) saved
    twice: as Qwen3 renders (several generation contexts per side) and with a template that keeps
    every turn's reasoning (prefix-stable: one sequence per side)."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import family_tokenizer, with_template

    tokenizer = family_tokenizer("qwen3")
    assert QWEN3_DROPS_REASONING in tokenizer.chat_template
    stable = with_template("qwen3", tokenizer.chat_template.replace(QWEN3_DROPS_REASONING, "{%- if true %}"))
    out = {}
    for name, tok in (("multi-context", tokenizer), ("prefix-stable", stable)):
        out[name] = WORK / f"qwen3-{name}-tokenizer"
        if not (out[name] / "tokenizer_config.json").exists():
            tok.save_pretrained(out[name])
    return out


def sequences_per_side(cache: Path) -> float:
    from mtdpo.cache import open_cache

    opened = open_cache(cache)
    records = [opened.record(k) for k in range(len(opened.dataset))]
    return sum(len(side.pieces()) for r in records for side in (r.chosen, r.rejected)) / (2 * len(records))


def scenario_groups(quick: bool) -> dict:
    """Pairs of `mtdpo pairs --rule all` (16 per problem), 16 pairs per micro-batch. Padded, sharing
    and TRL time one step (a TRL step of 16 pairs costs ~40 CPU-seconds; their steps are alike);
    the forests, whose micro-batches vary (group-by-prompt makes a problem's leftover pairs a
    micro-batch of their own), time 4 steps after the warm-up: an epoch of the 4 problems."""
    steps, warm, batch, problems = 2, 1, 16, 4
    prompt, tool = 32 if quick else 64, 32
    rollouts = write_group_rollouts(WORK / f"groups-{prompt}-{tool}-{problems}.jsonl", problems, prompt, tool)
    rows = group_pairs(rollouts)
    cache = cache_for(rows, f"groups-{prompt}-{tool}-{problems}")
    systems = {
        "forest + group-by-prompt": {"cache": cache, "mode": FOREST_GROUPS, "steps": warm + problems},
        "forest, a problem per micro-batch": {"cache": cache, "mode": FOREST_CACHE_ORDER, "steps": warm + problems},
        "prefix-sharing": {"cache": cache, "mode": SHARING},
        "padded": {"cache": cache, "mode": PADDED},
        "TRL": {"rows": rows},
    }
    targets = [
        ("forest ≥ 2× per-pair prefix sharing", "forest + group-by-prompt", "prefix-sharing", "tokens_per_cpu_s", 2.0),
        ("forest ≥ 3× TRL", "forest + group-by-prompt", "TRL", "tokens_per_cpu_s", 3.0),
        (
            "(whole problems) forest ≥ 2× per-pair prefix sharing",
            "forest, a problem per micro-batch",
            "prefix-sharing",
            "tokens_per_cpu_s",
            2.0,
        ),
        ("(whole problems) forest ≥ 3× TRL", "forest, a problem per micro-batch", "TRL", "tokens_per_cpu_s", 3.0),
    ]
    data = {
        **cache_stats(cache),
        "pairs_per_problem": 16,
        "prompt_filler_tokens": prompt,
        "tool_filler_tokens": tool,
    }
    return dict(
        systems=systems, targets=targets, data=data, steps=steps, warm=warm, batch=batch, model=model_dir(quick)
    )


def scenario_contexts(quick: bool) -> dict:
    """Qwen3 rows (3 answers with reasoning, follow-up questions) as Qwen3 renders them and prefix-stable."""
    steps, warm, batch = 3, 1, 2
    length = 256 if quick else 1024
    rows = write_context_rows(WORK / f"contexts-{length}.jsonl", batch * steps, length)
    tokenizers = qwen3_tokenizers()
    caches = {name: cache_for(rows, f"contexts-{length}-{name}", tokenizer=tok) for name, tok in tokenizers.items()}
    systems = {
        f"{layout}, {name}": {"cache": caches[name], "mode": mode}
        for name in caches
        for layout, mode in (("forest", FOREST), ("prefix-sharing", SHARING))
    }
    targets = [
        (
            "forest cost on multi-context ≤ 1.2× forest on prefix-stable",
            "forest, prefix-stable",
            "forest, multi-context",
            "pairs_per_cpu_s",
            -1.2,
        ),
        (
            "forest cost on multi-context ≤ 1.2× prefix sharing on prefix-stable",
            "prefix-sharing, prefix-stable",
            "forest, multi-context",
            "pairs_per_cpu_s",
            -1.2,
        ),
    ]
    data = {
        name: {**cache_stats(cache), "sequences_per_side": sequences_per_side(cache)} for name, cache in caches.items()
    }
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizers["multi-context"])))
    return dict(
        systems=systems, targets=targets, data=data, steps=steps, warm=warm, batch=batch, model=model_dir(quick, vocab)
    )


def scenario_pairs(quick: bool) -> dict:
    """Single multi-turn pairs (bench/train.py's rows) at ~1k tokens: one pair per prompt."""
    steps, warm, batch = 3, 1, 2
    length = 256 if quick else 1024
    n = 4 * batch * steps
    rows = write_multiturn_rows(WORK / f"forest-pairs-{length}-{n}.jsonl", n, approx_tokens=length)
    cache = cache_for(rows, f"forest-pairs-{length}-{n}")
    systems = {
        name: {"cache": cache, "mode": mode}
        for name, mode in (("prefix-forest", FOREST), ("prefix-sharing", SHARING), ("padded", PADDED))
    }
    targets = [
        ("forest ≥ 0.97× per-pair prefix sharing", "prefix-forest", "prefix-sharing", "tokens_per_cpu_s", 0.97),
        ("prefix sharing ≥ 1.2× padded", "prefix-sharing", "padded", "tokens_per_cpu_s", 1.2),
    ]
    return dict(
        systems=systems,
        targets=targets,
        data=cache_stats(cache),
        steps=steps,
        warm=warm,
        batch=batch,
        model=model_dir(quick),
    )


SCENARIOS = {"groups": scenario_groups, "contexts": scenario_contexts, "pairs": scenario_pairs}


def benchmark_scenario(name: str, quick: bool, bf16: bool, repeats: int, threads: int, parallel: int) -> dict:

    scenario = SCENARIOS[name](quick)
    systems, model = scenario["systems"], scenario["model"]
    results = {
        "kind": f"forest-{name}",
        "machine": _machine(),
        "quick": quick,
        "bf16": bf16,
        **{k: scenario[k] for k in ("steps", "warm", "batch", "data")},
        "repeats": repeats,
        "threads": threads,
        "parallel": parallel,
        "model": {**json.loads((model / "config.json").read_text()), "parameters": _parameters(model)},
        "targets": scenario["targets"],
        "runs": {system: [] for system in systems},
    }
    print(f"{name}: {json.dumps(scenario['data'])}", flush=True)

    def run(system):
        spec = systems[system]
        return run_worker(
            threads,
            system="TRL" if "rows" in spec else system,
            model=str(model),
            rows=str(spec.get("rows", "")),
            cache=str(spec.get("cache", "")),
            mode=spec.get("mode"),
            steps=spec.get("steps", scenario["steps"]),
            batch=scenario["batch"],
            bf16=bf16,
            warm=scenario["warm"],
        )

    results["runs"] = interleaved(
        list(systems),
        repeats,
        parallel,
        run,
        lambda r: (
            f"{r['tokens_per_cpu_s']:8.1f} tok/CPU-s, {r['pairs_per_cpu_s']:6.3f} pairs/CPU-s, {r['peak_rss_mb']:6.0f} MB"
        ),
    )
    results["summary"] = summarise(results["runs"])
    return results


def target_lines(results: dict) -> list[str]:
    """Each target with its measured ratio: of medians, of minima, and each repeat's own (runs
    made at the same time). A negative bound is a cost: the denominator's time over the numerator's."""
    lines = []
    for text, a, b, key, bound in results["targets"]:
        runs, summary = results["runs"], results["summary"]
        cost = bound < 0
        ratio = summary[a][key]["median"] / summary[b][key]["median"]
        low = summary[a][key]["min"] / summary[b][key]["min"]
        each = [x[key] / y[key] for x, y in zip(runs[a], runs[b])]
        met = ratio <= -bound if cost else ratio >= bound
        lines.append(
            f"- {text}: **{'met' if met else 'missed'}**, {ratio:.2f}× (ratio of minima {low:.2f}×; each repeat "
            f"{', '.join(f'{r:.2f}' for r in each)}): {f'time per pair of {b} / {a}' if cost else f'{a} / {b}'}, {key}"
        )
    return lines


def scenario_table(results: dict) -> str:
    summary, data = results["summary"], results["data"]
    precision = "bf16" if results["bf16"] else "fp32"
    lines = [
        "| system | pair tokens per CPU-s, median (min) | pairs per CPU-s, median (min) | pair tokens per wall-s, median | row tokens per pair | peak RSS MB, median (max) | timed steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system, values in summary.items():
        row_tokens = statistics.median(r["row_tokens_per_pair"] for r in results["runs"][system])
        cells = [
            system,
            f"{values['tokens_per_cpu_s']['median']:,.0f} ({values['tokens_per_cpu_s']['min']:,.0f})",
            f"{values['pairs_per_cpu_s']['median']:.3f} ({values['pairs_per_cpu_s']['min']:.3f})",
            f"{values['tokens_per_s']['median']:,.0f}",
            "" if system == "TRL" else f"{row_tokens:,.0f}",
            f"{values['peak_rss_mb']['median']:,.0f} ({values['peak_rss_mb']['max']:,.0f})",
            str(results["runs"][system][0]["steps_timed"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    machine = results["machine"]
    lines += [
        "",
        f"Median (min) of {results['repeats']} runs each, interleaved, {results['threads']} thread(s) per process, "
        f"{results['parallel']} processes at a time, {precision} on every side, {results['batch']} pairs per micro-batch "
        f"(with group-by-prompt: up to that many), the timed steps after {results['warm']} warm-up; "
        f"{results['model']['parameters'] / 1e6:.1f}M parameters. Load average "
        f"{machine['load_before'][0]:.1f} before, {machine.get('load_after', [float('nan')])[0]:.1f} after; {machine['date']}.",
        f"Data: {json.dumps(data)}",
        "",
        *target_lines(results),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        print(json.dumps(worker(**json.loads(sys.argv[2]))))
        return
    from mtdpo.train.config import auto_bf16

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, short rows, one repeat: checks the harness")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="precision of both systems (default: mtdpo's choice for this machine)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per system and length (default 2; --quick: 1)")
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="print the tables of earlier results (several: their lengths side by side)",
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="approximate tokens per sequence (default 1024 2048; --quick: 256 512)",
    )
    parser.add_argument(
        "--name", default=None, help="results file stem in bench/results (default train, or train-quick)"
    )
    parser.add_argument(
        "--parallel", type=int, default=2, help="measurements running at once (each its own process and system)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (1: CPU time is not inflated by other jobs)"
    )
    parser.add_argument(
        "--kto", action="store_true", help="KTO beside DPO at equal tokens (mtdpo, with live and stored references)"
    )
    for name, help in (
        (
            "groups",
            "prefix forest on `mtdpo pairs --rule all` pairs (4 correct x 4 incorrect per problem) vs per-pair sharing, padded and TRL",
        ),
        (
            "contexts",
            "prefix forest on Qwen3 sides of several generation contexts vs the same rows rendered prefix-stable",
        ),
        ("pairs", "prefix forest on single multi-turn pairs (~1k tokens) vs per-pair sharing and padded"),
    ):
        parser.add_argument(f"--{name}", action="store_true", help=f"{help}; fp32 unless --bf16 (issue 33's targets)")
    args = parser.parse_args()
    scenario = next((name for name in SCENARIOS if getattr(args, name)), None)
    if scenario:
        results = benchmark_scenario(
            scenario, args.quick, bool(args.bf16), args.repeats or (1 if args.quick else 3), args.threads, args.parallel
        )
        results["machine"]["load_after"] = os.getloadavg()
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = args.name or (f"train-forest-{scenario}" + ("-quick" if args.quick else ""))
        (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
        markdown = scenario_table(results)
        (RESULTS / f"{stem}.md").write_text(markdown)
        print(markdown)
        return
    if args.kto:
        bf16 = auto_bf16(use_cpu=True)[0] if args.bf16 is None else args.bf16
        results = benchmark_kto(
            args.quick,
            bf16,
            args.repeats or (1 if args.quick else 3),
            args.threads,
            args.parallel,
            tuple(args.lengths or ()),
        )
        results["machine"]["load_after"] = os.getloadavg()
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = args.name or ("train-kto-quick" if args.quick else "train-kto")
        (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
        markdown = kto_table(results) + "\n" + kto_table(results, "tokens_per_s")
        (RESULTS / f"{stem}.md").write_text(markdown)
        print(markdown)
        return
    forest_tables = [json.loads(Path(path).read_text()) for path in args.table or ()]
    if forest_tables and all(str(t.get("kind", "")).startswith("forest-") for t in forest_tables):
        print("\n".join(scenario_table(t) for t in forest_tables))  # the tables of --groups/--contexts/--pairs runs
        return
    if args.table:  # e.g. the ~1k and ~2k tokens runs made separately
        print(table(merged_results(args.table)) + "\n" + table(merged_results(args.table), "tokens_per_s"))
        return
    bf16 = auto_bf16(use_cpu=True)[0] if args.bf16 is None else args.bf16
    results = benchmark(
        args.quick,
        bf16,
        args.repeats or (1 if args.quick else 2),
        args.threads,
        args.parallel,
        tuple(args.lengths or ()),
    )
    results["machine"]["load_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("train-quick" if args.quick else "train")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = table(results) + "\n" + table(results, "tokens_per_s")
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
