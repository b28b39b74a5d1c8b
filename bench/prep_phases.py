"""Where one preprocess() run spends its time: the main process's CPU per phase, each worker
chunk's wall interval, and the wall time of the run. What docs/PERFORMANCE.md uses to explain
what `--num-proc 2` loses against `--num-proc 1`.

    python bench/prep_phases.py bench/work/prep-2000.jsonl --num-proc 2
    python bench/prep_phases.py bench/work/prep-2000-gemma.jsonl --tokenizer bench/work/gemma3-tokenizer --num-proc 2
    python bench/prep_phases.py ... --sync-save     # the tokenizer copy saved before the rows, not by a forked process
    python bench/prep_phases.py ... --encode-once   # the ceiling of the main process: workers reuse one encoded pair

Each run in its own process (`--runs N`, default 2). Phases of the main process (getrusage,
user + system): the tokenizer load; the rows (the encoder, the forks, handing out chunks,
writing shards; with --sync-save also the tokenizer copy); the end (checksums, manifest, the
tokenizer freed when preprocess() returns). Chunk times are
perf_counter intervals from the start of preprocess(), taken inside each worker.

--encode-once: each worker still parses every line and builds each chunk's Arrow table, but
answers every row with the record of the first one it encoded (a real record of realistic
size), so the encoding leaves the run. What remains is the main process's own work (reading,
handing out chunks, taking back tables, writing shards) and the workers' parse and Arrow: the
rows phase's rows per wall second is then a floor on how many rows per second the main process
can take in, the number that says whether it would limit --num-proc 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import _cpu_seconds  # bench/run.py: the CPU clock of its preparation workers

REPO = Path(__file__).resolve().parent.parent


def main_cpu() -> float:
    return _cpu_seconds(children=False)


_started, _encode_chunk = 0.0, None  # set by worker(); module-level so the pool can pickle timed_chunk


def timed_chunk(chunk):
    begin = time.perf_counter()
    result = _encode_chunk(chunk)
    # Written by the worker itself (a forked worker's lists are not the main process's), in one
    # write below the pipe's atomic size: two workers' lines never interleave.
    line = json.dumps(
        {"pid": os.getpid(), "first_row": chunk[0][0], "start": begin - _started, "end": time.perf_counter() - _started}
    )
    os.write(sys.stdout.fileno(), (line + "\n").encode())
    return result


class _EncodeOnce:
    """A RecordBuilder that builds the first row it sees and answers every row with that record."""

    def __init__(self, tokenizer, options):
        from mtdpo.preprocess.records import RecordBuilder

        self.builder, self.record = RecordBuilder(tokenizer, options), None

    def __call__(self, n, row):
        if self.record is None:
            self.record = self.builder(n, row)
        record, truncated = self.record
        return dataclasses.replace(record, row=n), truncated


def worker(rows: str, tokenizer: str | None, num_proc: int, sync_save: bool, encode_once: bool = False) -> dict:
    from transformers import AutoTokenizer  # noqa: F401  imported before the clock starts, as in bench/run.py

    import mtdpo.preprocess.pipeline as pipeline

    if sync_save:
        pipeline.BACKGROUND_SAVE_VOCAB = 1 << 62  # every tokenizer counts as small: saved at once
    if encode_once:
        pipeline.RecordBuilder = _EncodeOnce
    marks: dict[str, tuple[float, float]] = {}  # name -> (main-process CPU, wall clock)
    global _started, _encode_chunk
    _started, _encode_chunk = time.perf_counter(), pipeline.encode_chunk

    def marking(name, fn, before=False):
        """fn, noting the main process's CPU clock as `name` before or after each call."""

        def marked(*args, **kwargs):
            if before:
                marks[name] = main_cpu(), time.perf_counter()
            result = fn(*args, **kwargs)
            if not before:
                marks[name] = main_cpu(), time.perf_counter()
            return result

        return marked

    pipeline.load_tokenizer = marking("load", pipeline.load_tokenizer)
    pipeline.write_dataset_files = marking("rows", pipeline.write_dataset_files, before=True)  # the rows are done
    pipeline.encode_chunk = timed_chunk
    begin_cpu = main_cpu()
    out = Path(tempfile.mkdtemp()) / "cache"
    stats = pipeline.preprocess(Path(rows), out, tokenizer=tokenizer, num_proc=num_proc, progress=False)
    end_cpu, wall = main_cpu(), time.perf_counter() - _started
    return {
        "wall_s": wall,
        "rows": stats["rows"],
        "rows_wall_s": marks["rows"][1] - marks["load"][1],  # from the tokenizer loaded to the last shard written
        "main_cpu_s": {
            "load": marks["load"][0] - begin_cpu,
            "rows": marks["rows"][0] - marks["load"][0],
            "end": end_cpu - marks["rows"][0],
        },
    }


def run_once(args) -> dict:
    command = [sys.executable, __file__, "--worker", args.rows, "--num-proc", str(args.num_proc)]
    command += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    command += ["--sync-save"] if args.sync_save else []
    command += ["--encode-once"] if args.encode_once else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"worker failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result = lines[-1]
    result["chunks"] = sorted(lines[:-1], key=lambda c: c["start"])
    return result


def report(result: dict) -> None:
    cpu, n = result["main_cpu_s"], result["rows"]
    print(
        f"wall {result['wall_s']:.2f} s; main-process CPU: load {cpu['load']:.2f} s, rows {cpu['rows']:.2f} s "
        f"({1000 * cpu['rows'] / n:.4f} ms per row), end {cpu['end']:.2f} s; rows phase {result['rows_wall_s']:.2f} s "
        f"wall, {n / result['rows_wall_s']:,.0f} rows/s"
    )
    chunks = result["chunks"]
    if len(chunks) > 40:  # a summary, not hundreds of lines
        took = sorted(c["end"] - c["start"] for c in chunks)
        print(
            f"  {len(chunks)} chunks: {took[0]:.3f} s (min), {took[len(took) // 2]:.3f} s (median), {took[-1]:.3f} s (max)"
        )
        return
    for c in chunks:
        print(
            f"  pid {c['pid']} rows {c['first_row']:>6}: {c['start']:7.3f}–{c['end']:7.3f} s ({c['end'] - c['start']:.3f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", help="a jsonl file of pairs (bench/run.py writes bench/work/prep-2000.jsonl)")
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: the embedded tokenizer)")
    parser.add_argument("--num-proc", type=int, default=2, help="preprocess worker processes")
    parser.add_argument(
        "--sync-save", action="store_true", help="save the tokenizer copy before the rows, not in a forked process"
    )
    parser.add_argument(
        "--encode-once",
        action="store_true",
        help="workers reuse one encoded pair: the main process's ceiling (see above)",
    )
    parser.add_argument("--runs", type=int, default=2, help="runs, each in its own process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.rows, args.tokenizer, args.num_proc, args.sync_save, args.encode_once)))
        return
    for _ in range(args.runs):
        report(run_once(args))


if __name__ == "__main__":
    main()
