"""Preprocess a fixed set of inputs and print a SHA-256 per cache file: the evidence behind
"byte-identical caches" when stage one is refactored or sped up.

Run it against two trees (each with its own `mtdpo` package) and diff the outputs:

    python scripts/cache_digest.py --tree /path/to/old --work /tmp/old > old.txt
    python scripts/cache_digest.py --tree .              --work /tmp/new > new.txt
    diff old.txt new.txt

Inputs: the bundled sample (assistant and seed mode, --num-proc 1 and 2), the fault corpus
(embedded template and Gemma 2's), and synthetic tool-use pairs and the sample's conversations
(tool results as user turns) through every family tokenizer
of tests/templates (built once into --tokenizers, from this tree's tests/helpers.py). stats.json
is digested without its timing fields; manifest.json without mtdpo_version and with the scratch
directory's path replaced by WORK.

`--without COLUMN ...` compares the caches as if those columns did not exist, to show that a
change which adds a column leaves every other byte of meaning as it was: the Arrow shards are
digested by their other columns' values, dataset_info.json without those features, and
checksums.json (which hashes the files) is left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMING_FIELDS = ("seconds", "rows_per_second")


def family_tokenizers(directory: Path) -> dict[str, Path]:
    """Each tests/templates family tokenizer saved under `directory` (reused when present)."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import FAMILIES, family_tokenizer

    saved = {}
    for family in FAMILIES:
        path = directory / family
        if not (path / "tokenizer_config.json").is_file():
            family_tokenizer(family).save_pretrained(str(path))
        saved[family] = path
    return saved


def tool_rows(path: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from mtdpo.synthetic import make_tool_pairs

    with open(path, "w") as f:
        for row in make_tool_pairs(60, seed=3):
            f.write(json.dumps(row) + "\n")
    return path


def plain_rows(sample: Path, path: Path) -> Path:
    """The sample with tool results as user turns: rows every family's template accepts."""
    with open(sample) as f, open(path, "w") as out:
        for line in f:
            row = json.loads(line)
            for side in ("chosen", "rejected"):
                row[side] = [dict(m, role="user") if m["role"] == "tool" else m for m in row[side]]
            out.write(json.dumps(row) + "\n")
    return path


def runs(work: Path, tokenizers: dict[str, Path]) -> list[tuple[str, list[str]]]:
    sample = REPO / "mtdpo" / "assets" / "sample.jsonl"
    faults = REPO / "tests" / "data" / "faults.jsonl"
    tools, plain = tool_rows(work / "tools.jsonl"), plain_rows(sample, work / "plain.jsonl")
    out = [
        ("sample", [str(sample)]),
        ("sample-np2", [str(sample), "--num-proc", "2"]),
        ("sample-seed", [str(sample), "--mask-mode", "seed"]),
        ("sample-short", [str(sample), "--max-length", "200"]),
        ("faults", [str(faults)]),
        ("faults-gemma2", [str(REPO / "tests" / "data" / "gemma2_faults.jsonl"), "--chat-template", "gemma2"]),
    ]
    for family, path in tokenizers.items():
        out += [
            (f"tools-{family}", [str(tools), "--tokenizer", str(path)]),
            (f"plain-{family}", [str(plain), "--tokenizer", str(path)]),
        ]
    return out


def digest(cache: Path, without: tuple[str, ...] = ()) -> dict[str, str]:
    sums = {}
    for file in sorted(p for p in cache.rglob("*") if p.is_file()):
        name = str(file.relative_to(cache))
        if name in ("verified.json", "state.json") or name.startswith("tokenizer/"):
            continue
        if without and name == "checksums.json":
            continue
        data = file.read_bytes()
        if without and name.endswith(".arrow"):
            import pyarrow as pa

            opened = pa.ipc.open_stream if data[:6] != b"ARROW1" else pa.ipc.open_file  # shards, sequence starts
            table = opened(pa.BufferReader(data)).read_all()
            table = table.drop_columns([c for c in without if c in table.column_names])
            data = json.dumps(table.to_pydict(), sort_keys=True).encode()
        elif without and name.endswith("dataset_info.json"):
            info = json.loads(data)
            info["features"] = {k: v for k, v in info.get("features", {}).items() if k not in without}
            data = json.dumps(info, sort_keys=True).encode()
        elif name == "stats.json":
            stats = {k: v for k, v in json.loads(data).items() if k not in TIMING_FIELDS}
            data = json.dumps(stats, sort_keys=True).encode()
        elif name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("mtdpo_version", None)
            data = json.dumps(manifest, sort_keys=True).replace(str(cache.parent), "WORK").encode()
        sums[name] = hashlib.sha256(data).hexdigest()[:16]
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout whose mtdpo package preprocesses")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory for the caches")
    parser.add_argument("--tokenizers", type=Path, default=Path("/tmp/mtdpo-family-tokenizers"))
    parser.add_argument("--without", nargs="*", default=(), help="columns to leave out of the comparison")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(args.tree.resolve()), "HF_HUB_OFFLINE": "1"}
    for name, argv in runs(args.work, family_tokenizers(args.tokenizers)):
        cache = args.work / name
        cmd = [sys.executable, "-m", "mtdpo", "preprocess", *argv, "--out", str(cache), "--overwrite", "-q"]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            message = result.stderr.strip().splitlines()[-1:]
            print(f"{name}: exit {result.returncode}: {str(message).replace(str(args.work), 'WORK')}")
            continue
        for file, value in digest(cache, tuple(args.without)).items():
            print(f"{name}/{file} {value}")


if __name__ == "__main__":
    main()
