"""Run a command and report its wall time and the peak RSS of its whole process tree.

    python bench/measure_tree.py --out peak.json -- mtdpo preprocess big.jsonl --out data_cache/big --num-proc 2

Every --interval seconds it sums VmRSS, RssAnon and PSS over the command and all its
descendants (read from /proc, Linux only); the peaks of those sums are what the machine had to
hold at once. It also records the largest single process and the load average, before and
after. Writes JSON. `--pid P` watches a process that is already running instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended between listdir and read
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))  # fields[1] is the parent pid
    return tree


def rss_kib(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, Pss) in KiB. RSS also counts pages of memory-mapped files (the Arrow
    shards being read back), which the kernel can drop at any time; RssAnon is the heap. Forked
    workers share their parent's pages: the sum of RSS counts those twice, the sum of PSS once."""
    sizes = {"VmRSS": 0, "RssAnon": 0, "Pss": 0}
    for name in ("status", "smaps_rollup"):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                key = line.split(":")[0]
                if key in sizes:
                    sizes[key] = int(line.split()[1])
        except OSError:
            pass
    return sizes["VmRSS"], sizes["RssAnon"], sizes["Pss"]


def tree_rss(root: int) -> tuple[int, int, int, int, int]:
    """Sums of RSS, RssAnon and PSS, the largest single RSS (all KiB), and the number of processes,
    over root and its descendants."""
    tree, todo, sizes = children_of(), [root], []
    while todo:
        pid = todo.pop()
        sizes.append(rss_kib(pid))
        todo.extend(tree.get(pid, []))
    return (
        sum(s[0] for s in sizes),
        sum(s[1] for s in sizes),
        sum(s[2] for s in sizes),
        max(s[0] for s in sizes),
        len(sizes),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--pid", type=int, help="watch this running process instead of starting the command")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = None if args.pid else subprocess.Popen(command)
    root = args.pid or proc.pid
    peak_sum = peak_anon = peak_pss = peak_single = peak_procs = 0
    samples = []  # (seconds, tree RSS, RssAnon, PSS in MiB), for a curve of memory against time
    while (proc.poll() is None) if proc else Path(f"/proc/{root}").exists():
        total, anon, pss, single, procs = tree_rss(root)
        peak_sum, peak_anon, peak_pss = max(peak_sum, total), max(peak_anon, anon), max(peak_pss, pss)
        peak_single, peak_procs = max(peak_single, single), max(peak_procs, procs)
        samples.append((round(time.perf_counter() - started, 1), *(round(kib / 1024, 1) for kib in (total, anon, pss))))
        time.sleep(args.interval)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and the descendants it waited for
    result = {
        "command": command or f"pid {root}",
        "cpu_seconds": round(children.ru_utime + children.ru_stime, 1) if proc else None,
        "returncode": proc.returncode if proc else None,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_tree_rss_mib": round(peak_sum / 1024, 1),
        "peak_tree_rss_anon_mib": round(peak_anon / 1024, 1),
        "peak_tree_pss_mib": round(peak_pss / 1024, 1),
        "peak_single_process_rss_mib": round(peak_single / 1024, 1),
        "max_processes": peak_procs,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "samples": samples,
    }
    args.out.write_text(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}), file=sys.stderr)
    sys.exit(proc.returncode if proc else 0)


if __name__ == "__main__":
    main()
