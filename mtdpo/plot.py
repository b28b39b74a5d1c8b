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


ACCURACY = "rewards/accuracies"
TIE = 0.5  # where a step whose margins were all 0 is drawn: a tie is chance, not "always wrong"


def is_tie(entry: dict, prefix: str = "") -> bool:
    """Every margin exactly 0 (the policy still equals its reference): accuracy, the fraction of
    margins > 0, reads 0.00 there; the log line says "tie" and the plot draws its own marker."""
    return entry.get(f"{prefix}rewards/ties", 0.0) >= 1.0


def curve(entries: list[dict], key: str, prefix: str = "") -> tuple[list[tuple], list[int]]:
    """(step, value) points of a metric, and for accuracy the steps that were ties (not among the points)."""
    name = prefix + key
    ties = [e["step"] for e in entries if key == ACCURACY and name in e and is_tie(e, prefix)]
    return [(e["step"], e[name]) for e in entries if name in e and e["step"] not in ties], ties


def plot_run(run: Path, out: Path) -> dict:
    """Draw the curves to `out`; returns the first and last logged values of each plotted key
    (accuracy's as printed: "0.50", or "tie")."""
    plt = pyplot()
    train, evals = read_metrics(run)
    curves = KTO_CURVES if any("kto_loss" in e for e in train) else CURVES
    fig, axes = plt.subplots(1, len(curves), figsize=(16, 4.5))
    drawn = {}
    for axis, (title, keys) in zip(axes, curves):
        for key, label in keys:
            points, ties = curve(train, key)
            if not points and not ties:
                continue
            color = axis.plot(*zip(*points), marker=".", label=label)[0].get_color() if points else "grey"
            eval_points, eval_ties = curve(evals, key, "eval_")
            if eval_points:
                axis.plot(*zip(*eval_points), linestyle="--", marker="o", color=color, label=f"eval {label}")
            if ties or eval_ties:
                steps = ties + eval_ties
                axis.scatter(steps, [TIE] * len(steps), marker="x", color="grey", zorder=3, label="tie (all margins 0)")
            if key == ACCURACY:  # as the log lines print it
                logged = [e for e in train if key in e]
                drawn[key] = tuple("tie" if is_tie(e) else f"{e[key]:.2f}" for e in (logged[0], logged[-1]))
            else:
                drawn[key] = (points[0][1], points[-1][1])
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
