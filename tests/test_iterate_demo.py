"""`make iterate-demo` (scripts/iterate_demo.sh): the paper's iterative round twice, M-DPO then
M-KTO, run here on the first 3 problems of each bundled rollouts file and one step per training;
and the scripts it calls."""

import json
import os
import subprocess
import sys

from helpers import REPO

from mtdpo.assets import ROLLOUTS, ROLLOUTS_ROUND2
from mtdpo.cache import open_cache


def first_problems(path, out, problems=3):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ids = list(dict.fromkeys(r["prompt_id"] for r in rows))[:problems]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows if r["prompt_id"] in ids))
    return out


def test_the_demo_runs_both_rounds_of_both_objectives(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "MTDPO": f"{sys.executable} -m mtdpo",
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "cache"),
        "RUNS": str(tmp_path / "runs"),
        "ROUND1": str(first_problems(ROLLOUTS, tmp_path / "r1.jsonl")),
        "ROUND2": str(first_problems(ROLLOUTS_ROUND2, tmp_path / "r2.jsonl")),
        "TRAIN_ARGS": "--max-steps 1 --logging-steps 1",
    }
    result = subprocess.run(
        ["bash", REPO / "scripts" / "iterate_demo.sh"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "runs"
    for name in ("sft", "round1", "round2", "round2-fixed-reference", "round1-kto", "round2-kto"):
        assert (runs / name / "model.safetensors").is_file() and (runs / name / "tokenizer.json").is_file(), name
    assert open_cache(tmp_path / "cache" / "round2").kind == "pair"
    assert open_cache(tmp_path / "cache" / "round2-kto").kind == "kto"
    out = result.stdout
    # each step says what it kept and why, and which reference it trains against
    assert "M-DPO round 2, KL-regularized" in out and "reference: --ref-model" in out
    assert out.count("reference: a frozen copy of the policy") == 4
    assert "kto 0.5000" in out  # step 1 of a KTO round: the policy is its reference
    assert "shuffled" in out and "KTO rows (desirable / undesirable)" in out


def test_shuffling_is_a_seeded_permutation(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from shuffle_rows import shuffled

    lines = [f'{{"n": {i}}}\n' for i in range(20)]
    once, again = shuffled(lines, 42), shuffled(lines, 42)
    assert once == again and sorted(once) == sorted(lines) and once != lines
    assert shuffled(lines, 1) != once
