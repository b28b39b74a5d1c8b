"""How long a cache takes to open with an empty page cache, and how much it reads from disk.

    python bench/cold_open.py data_cache/1k data_cache/1m --repeats 3     # as root: drops the page cache
    python bench/cold_open.py data_cache/1m --rebatch 10000               # also a copy in batches of 10,000 pairs

Each open runs in its own process after `sync; echo 3 > /proc/sys/vm/drop_caches`: the time of
`mtdpo.cache.open_cache` plus the length columns train reads at start-up, the bytes the process
read from disk (/proc/self/io read_bytes: page faults on the memory maps included), and the same
again warm. The device's read-ahead is printed beside them: each record batch header's page
fault reads that much ahead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def read_bytes() -> int:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines() if line)
    return int(fields["read_bytes"])


def worker(cache: str) -> dict:
    from mtdpo.cache import open_cache, pair_lengths

    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
    before, started = read_bytes(), time.perf_counter()
    pairs = len(pair_lengths(open_cache(cache).dataset))
    cold, read = time.perf_counter() - started, read_bytes() - before
    started = time.perf_counter()
    pair_lengths(open_cache(cache).dataset)
    return {
        "cache": cache,
        "pairs": pairs,
        "cold_s": round(cold, 3),
        "read_MB": round(read / 1e6),
        "warm_s": round(time.perf_counter() - started, 3),
    }


def rebatch(cache: Path, rows: int) -> Path:
    """A copy of the cache whose shards hold record batches of `rows` pairs (the same rows)."""
    import shutil

    import pyarrow as pa

    from mtdpo.cache.files import write_checksums

    copy = cache.with_name(f"{cache.name}-batches-{rows}")
    shutil.copytree(cache, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("data-*.arrow"))
    for shard in sorted(cache.glob("data-*.arrow")):
        with pa.memory_map(str(shard)) as source:
            table = pa.ipc.open_stream(source).read_all().combine_chunks()
        with pa.OSFile(str(copy / shard.name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=rows):
                writer.write_batch(batch)
    write_checksums(
        copy, [shard.name for shard in sorted(copy.glob("data-*.arrow"))]
    )  # and the verified.json stamp, as preprocess leaves a cache: not walked at open
    return copy


def read_ahead_kb() -> dict:
    return {p.parent.parent.name: int(p.read_text()) for p in Path("/sys/block").glob("*/queue/read_ahead_kb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("caches", nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rebatch", type=int, metavar="N", help="also measure a copy of the last cache in batches of N pairs"
    )
    args = parser.parse_args()
    if args.rebatch:
        args.caches.append(str(rebatch(Path(args.caches[-1]), args.rebatch)))
    print("read-ahead (kB) per block device:", read_ahead_kb())
    for _ in range(args.repeats):
        for cache in args.caches:  # interleaved
            out = subprocess.run(
                [sys.executable, __file__, "--worker", cache], capture_output=True, text=True, cwd=REPO
            )
            if out.returncode:
                sys.exit(out.stderr.strip().splitlines()[-1])
            print(out.stdout.strip())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2])))
    else:
        main()
