"""`mtdpo plot`: training curves (loss, reward margins, accuracy) from runs/NAME/metrics.jsonl; for
a KTO run, the KL reference point instead of the accuracy (there are no pairs to be right about).

matplotlib is an optional extra (`pip install 'mtdpo[plot]'`); without it the commands that
draw stop with that hint instead of a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mtdpo.errors import UsageError


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'mtdpo[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(train logs, eval logs) from a run folder or a metrics.jsonl file, one entry per step.

    A resumed run logs again the steps after its checkpoint: the last entry of a step wins. A last
    line cut off by a kill (no newline, not JSON) is skipped with a note on stderr; a bad line
    anywhere else is an error.
    """
    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise UsageError(f"no metrics file at {path}; `mtdpo train --output-dir {run}` writes it")
    train, evals = {}, {}
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                print(
                    f"note: {path}, line {number}: skipped, cut off (the run was stopped while writing it)",
                    file=sys.stderr,
                )
                continue
            raise UsageError(f"{path}, line {number}: not JSON") from None
        if "loss" in entry:
            train[entry["step"]] = entry
        elif "eval_loss" in entry:
            evals[entry["step"]] = entry
    if not train:
        raise UsageError(f"{path} holds no training step yet (a line is written every --logging-steps)")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


CURVES = (  # panel title, [(metric key, label)]
    ("loss", [("loss", "loss (dpo + nll_coef · nll)"), ("dpo_loss", "dpo"), ("nll", "nll")]),
    ("rewards", [("rewards/margins", "margin"), ("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")]),
    ("preference accuracy", [("rewards/accuracies", "accuracy")]),
)
KTO_CURVES = (  # rewards of desirable rows are logged as "chosen", of undesirable ones as "rejected" (as TRL logs them)
    ("loss", [("loss", "loss (kto + nll_coef · nll)"), ("kto_loss", "kto"), ("nll", "nll")]),
    ("rewards", [("rewards/margins", "margin"), ("rewards/chosen", "desirable"), ("rewards/rejected", "undesirable")]),
    ("KL reference point", [("kl", "kl (z0)")]),
)


def plot_run(run: Path, out: Path) -> dict:
    """Draw the curves to `out`; returns the first and last logged values of each plotted key."""
    plt = pyplot()
    train, evals = read_metrics(run)
    curves = KTO_CURVES if any("kto_loss" in e for e in train) else CURVES
    fig, axes = plt.subplots(1, len(curves), figsize=(16, 4.5))
    drawn = {}
    for axis, (title, keys) in zip(axes, curves):
        for key, label in keys:
            points = [(e["step"], e[key]) for e in train if key in e]
            if not points:
                continue
            steps, values = zip(*points)
            line = axis.plot(steps, values, marker=".", label=label)[0]
            drawn[key] = (values[0], values[-1])
            eval_points = [(e["step"], e[f"eval_{key}"]) for e in evals if f"eval_{key}" in e]
            if eval_points:
                axis.plot(*zip(*eval_points), linestyle="--", marker="o", color=line.get_color(), label=f"eval {label}")
        axis.set(title=title, xlabel="step")
        if title == "preference accuracy":
            axis.set_ylim(-0.02, 1.02)
        if title == "rewards":
            axis.axhline(0, color="grey", linewidth=0.8)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"{run}: {train[-1]['step']} steps")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn
