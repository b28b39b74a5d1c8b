"""`mtdpo stats`: what is in a cache, before renting GPUs for it.

A pair cache is described side by side (chosen, rejected); a KTO cache by label (desirable,
undesirable rows), with the same numbers.

Lengths, turns, trained-token and trained tool-call counts (by the family's call token, e.g.
Qwen's `<tool_call>`) are read column-wise from the memory-mapped Arrow shards with numpy (no
Python loop over rows); counts and reject reasons come from
stats.json, manifest.json and rejects.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.table import Table
from rich.text import Text

from mtdpo.cache import IGNORE_INDEX, SIDES, KtoRecord, OpenCache, open_cache
from mtdpo.cache.manifest import counts_of
from mtdpo.cache.schema import KTO_GROUPS
from mtdpo.errors import UsageError
from mtdpo.preprocess.tokens import common_prefix_length

# ── per-row numbers, column-wise ──────────────────────────────────────────────


def per_row(list_column: pa.ChunkedArray, flags) -> np.ndarray:
    """For a list<int> column: per row, how many values `flags(values)` marks (numpy, chunk by chunk)."""
    out = [np.zeros(0, dtype=np.int64)]
    for chunk in list_column.chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy()[offsets[0] : offsets[-1]]  # zero-copy view of the mapped buffer
        out.append(_sum_between(flags(values, offsets - offsets[0]), offsets - offsets[0]))
    return np.concatenate(out)


def _sum_between(marks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    total = np.concatenate([[0], np.cumsum(marks, dtype=np.int64)])
    return total[offsets[1:]] - total[offsets[:-1]]


def trained_tokens(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Trained labels, not counting a row's first token (nothing predicts it: cache.trained_tokens)."""
    trained = values != IGNORE_INDEX
    trained[offsets[:-1][offsets[:-1] < len(values)]] = False
    return trained


def trained_run_starts(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """First token of each run of trained tokens (one run per trained assistant turn)."""
    trained = values != IGNORE_INDEX
    starts = trained.copy()
    starts[1:] &= ~trained[:-1]
    row_starts = offsets[:-1][offsets[:-1] < len(values)]
    starts[row_starts] = trained[row_starts]  # a row's first token has no predecessor
    return starts


def tokens_among(ids: list[int]):
    def flags(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return np.isin(values, ids)

    return flags


def summary(values: np.ndarray, digits: int = 1) -> dict | None:
    """min / mean / median / p95 / max (linear interpolation between order statistics)."""
    if len(values) == 0:
        return None
    values = np.asarray(values, dtype=np.float64)
    as_number = (lambda x: int(x)) if digits == 0 else (lambda x: round(float(x), digits))
    return {
        "min": as_number(values.min()),
        "mean": round(float(values.mean()), max(digits, 2)),
        "median": round(float(np.median(values)), max(digits, 1)),
        "p95": round(float(np.percentile(values, 95)), max(digits, 1)),
        "max": as_number(values.max()),
    }


# ── the whole cache ───────────────────────────────────────────────────────────


def groups_of(cache: OpenCache) -> tuple[str, str]:
    """What the numbers are split by: a pair's sides, or a KTO row's label."""
    return KTO_GROUPS if cache.is_kto else SIDES


def per_row_arrays(cache: OpenCache) -> dict[str, np.ndarray]:
    """Every per-pair number, one numpy array each (what --plot draws); for a KTO cache, each
    number of the desirable and of the undesirable rows."""
    arrays = {"prompt_len": cache.prompt_lengths(), "row": cache.source_rows()}
    family = cache.family()
    # Ids of the tokens that open a turn (None: the family is unknown or its markers are not single
    # tokens, as Mistral's [INST]), and of those that open one tool call (Qwen's <tool_call>; None
    # when the family writes calls without one, as Llama 3's JSON).
    start_ids = cache.token_ids(family.start_tokens) if family else None
    call_ids = cache.token_ids(family.call_tokens) if family else None
    if cache.is_kto:
        arrays["desirable"] = desirable = cache.desirable()
        columns = _sequence_arrays(*cache.token_columns(), cache.lengths(), start_ids, call_ids)
        for group, mask in zip(KTO_GROUPS, (desirable, ~desirable)):
            arrays.update({f"{group}_{name}": values[mask] for name, values in columns.items()})
        return arrays
    for side in SIDES:
        columns = _sequence_arrays(*cache.token_columns(side), cache.lengths(side), start_ids, call_ids)
        arrays.update({f"{side}_{name}": values for name, values in columns.items()})
    return arrays


def _sequence_arrays(ids, labels, lengths, start_ids, call_ids) -> dict[str, np.ndarray]:
    arrays = {
        "len": lengths,
        "trained": per_row(labels, trained_tokens),
        "trained_turns": per_row(labels, trained_run_starts),
    }
    if start_ids is not None:
        arrays["turns"] = per_row(ids, tokens_among(start_ids))
    if call_ids is not None:  # calls the model makes: trained call tokens (a label is its id)
        arrays["tool_calls"] = per_row(labels, tokens_among(call_ids))
    return arrays


def cache_stats(path: Path, batch_size: int = 8) -> dict:
    """Every number `mtdpo stats` prints; `batch_size`: the pairs per micro-batch the layout
    figures assume (training's --per-device-train-batch-size)."""
    cache = open_cache(path)
    manifest = cache.manifest
    arrays = per_row_arrays(cache)
    saved = _read_json(cache.stats_file) or {}
    counts = {name: saved.get(name, manifest.counts.get(name)) for name in counts_of(manifest.kind)}
    groups, unit = groups_of(cache), manifest.unit  # chosen / rejected pairs, or desirable / undesirable rows
    first = groups[0]
    out = {
        "cache": str(path),
        "kind": manifest.kind,
        f"{unit}s": len(arrays["row"]),
        "template_family": family.name if (family := cache.family()) else None,
        "mask_mode": manifest.mask_mode,
        "max_length": manifest.max_length,
        "counts": counts,
        "reasons": reject_reasons(cache.rejects_file, saved.get("reasons")),
        "lengths": {g: summary(arrays[f"{g}_len"], 0) for g in groups} | {"prompt": summary(arrays["prompt_len"], 0)},
        "turns": {g: summary(arrays[f"{g}_turns"], 0) for g in groups} if f"{first}_turns" in arrays else None,
        "trained_turns": {g: summary(arrays[f"{g}_trained_turns"], 0) for g in groups},
        "tool_calls": {g: summary(arrays[f"{g}_tool_calls"], 0) for g in groups}
        if f"{first}_tool_calls" in arrays
        else None,
        "tokens": {},
        "trained_fraction": {},
        f"trained_fraction_per_{unit}": {},
    }
    out["generation_contexts"] = generation_contexts(cache)
    out["layout_tokens"] = layout_tokens(cache, batch_size)
    if out["tool_calls"] is not None:
        out["tokens"]["tool_calls"] = {g: int(arrays[f"{g}_tool_calls"].sum()) for g in groups}
    for g in groups:
        total, trained = int(arrays[f"{g}_len"].sum()), int(arrays[f"{g}_trained"].sum())
        out["tokens"][g] = total
        out["tokens"][f"{g}_trained"] = trained
        out["trained_fraction"][g] = round(trained / total, 4) if total else None
        out[f"trained_fraction_per_{unit}"][g] = summary(_fraction(arrays, g), 3)
    out["tokens"]["total"] = out["tokens"][groups[0]] + out["tokens"][groups[1]]
    out["tokens"]["prompt"] = int(arrays["prompt_len"].sum())
    return out


def _fraction(arrays: dict, side: str) -> np.ndarray:
    lengths = arrays[f"{side}_len"]
    return np.divide(arrays[f"{side}_trained"], lengths, out=np.zeros(len(lengths)), where=lengths > 0)


def generation_contexts(cache: OpenCache) -> dict:
    """Sides scored in several generation contexts (a template that is not prefix-stable): how
    many, their sequences, and the context tokens they compute again (each later sequence's
    prefix shared with the one before it)."""
    out = {"pairs": len(cache.starts), "sides": {}, "sequences": {}, "repeated_context_tokens": {}}
    records = [cache.record(i) for i in cache.starts.indices()]
    for side in SIDES:
        pieces = [record.side(side).pieces() for record in records]
        several = [p for p in pieces if len(p) > 1]
        out["sides"][side] = len(several)
        out["sequences"][side] = sum(len(p) for p in several)
        out["repeated_context_tokens"][side] = sum(
            common_prefix_length(a.input_ids, b.input_ids) for p in several for a, b in zip(p, p[1:])
        )
    return out


def layout_tokens(cache: OpenCache, batch_size: int) -> dict:
    """Tokens one epoch computes in each layout: every sequence alone (padded or padding-free,
    padding not counted), prefix sharing (a pair's prompt once; pairs only) and the prefix forest
    (every prefix a micro-batch shares once, micro-batches of `batch_size` pairs or KTO rows
    grouped by prompt; a KTO row's KL sequence not counted, as in throughput)."""
    from mtdpo.train.forest import forest_tokens
    from mtdpo.train.sampler import group_batches

    keys, suffix, prompt = cache.prompts()
    forest = 0
    for batch in group_batches(keys, suffix, prompt, seed=42, batch_size=batch_size):
        forest += forest_tokens([ids for record in _records(cache, batch) for ids in _sequences(record)])
    if cache.is_kto:
        return {"batch_size": batch_size, "alone": int(cache.lengths().sum()), "prefix_forest": forest}
    alone = int(sum(cache.lengths(side).sum() for side in SIDES))
    return {
        "batch_size": batch_size,
        "alone": alone,
        "prefix_sharing": alone - int(np.maximum(cache.prompt_lengths().astype(np.int64) - 1, 0).sum()),
        "prefix_forest": forest,
    }


def _records(cache: OpenCache, indices: list[int]) -> list:
    return [cache.record(i) for i in indices] if cache.is_kto else cache.pairs.__getitems__(indices)


def _sequences(record) -> list[list[int]]:
    """The token sequences a record lays out: a KTO row's one, every piece of a pair's sides."""
    sides = [record.sequence] if isinstance(record, KtoRecord) else [record.side(side) for side in SIDES]
    return [piece.input_ids for side in sides for piece in side.pieces()]


def reject_reasons(path: Path, reasons: dict | None) -> list[dict]:
    """[{reason, count, first_row}] from stats.json's grouped reasons, with the first row of
    each found in rejects.jsonl (grouped by full reason when stats.json is missing)."""
    lines = []
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
    if reasons is None:
        reasons = {}
        for line in lines:
            reasons[line["reason"]] = reasons.get(line["reason"], 0) + 1
    out = []
    for reason, count in reasons.items():
        first = next((line["row"] for line in lines if line["reason"].startswith(reason)), None)
        out.append({"reason": reason, "count": count, "first_row": first})
    return out


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is corrupt: {err}") from None


# ── terminal table ────────────────────────────────────────────────────────────


def stats_tables(stats: dict) -> list:
    """A title line, the per-pair (KTO: per-row) distributions and the totals, for console.print."""
    kto = stats.get("kind") == "kto"
    groups, unit = (KTO_GROUPS, "row") if kto else (SIDES, "pair")
    title = Text(
        f"{stats['cache']}: {stats[f'{unit}s']:,} {'KTO rows' if kto else 'pairs'} · template {stats['template_family'] or 'unknown'}"
        f" · mask {stats['mask_mode']} · max length {stats['max_length']}",
        style="bold",
    )
    dist = Table()
    dist.add_column(f"per {unit}", style="bold")
    for name in ("min", "mean", "median", "p95", "max"):
        dist.add_column(name, justify="right")
    rows = [(f"{name} tokens", stats["lengths"][name], False) for name in (*groups, "prompt")]
    if stats["turns"]:
        rows += [(f"turns ({side})", stats["turns"][side], False) for side in groups]
    rows += [(f"trained turns ({side})", stats["trained_turns"][side], False) for side in groups]
    if stats.get("tool_calls"):
        rows += [(f"tool calls ({side})", stats["tool_calls"][side], False) for side in groups]
    rows += [(f"trained fraction ({side})", stats[f"trained_fraction_per_{unit}"][side], True) for side in groups]
    for name, values, is_fraction in rows:
        dist.add_row(name, *_cells(values, is_fraction))

    counts, tokens = stats["counts"], stats["tokens"]
    totals = Table(show_header=False)
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    totals.add_row("input rows", _int(counts["rows"]))
    totals.add_row(f"kept {unit}s", _int(counts["kept"]))
    if kto:
        totals.add_row("desirable / undesirable rows", f"{_int(counts['desirable'])} / {_int(counts['undesirable'])}")
    totals.add_row("rejected (unusable rows)", _int(counts["rejected"]))
    totals.add_row("dropped (nothing trained after truncation)", _int(counts["dropped"]))
    if stats["reasons"]:
        totals.add_row("rejected or dropped, by reason", "rows")
    for reason in stats["reasons"]:
        first = f", first row {reason['first_row']}" if reason["first_row"] is not None else ""
        totals.add_row(Text(f"  {reason['reason']}"), f"{reason['count']:,}{first}")  # text, not rich markup
    share = (
        f" ({counts['truncated'] / counts['kept']:.1%})" if counts["truncated"] is not None and counts["kept"] else ""
    )
    totals.add_row(f"kept {unit}s cut to {stats['max_length']} tokens", _int(counts["truncated"]) + share)
    a, b = groups
    totals.add_row(f"tokens {a} / {b} / total", f"{tokens[a]:,} / {tokens[b]:,} / {tokens['total']:,}")
    if kto:
        totals.add_row("prompt tokens (before each row's first trained token)", f"{tokens['prompt']:,}")
    else:
        totals.add_row("shared-prompt tokens (in each side)", f"{tokens['prompt']:,}")
    contexts = stats["generation_contexts"]
    if contexts["pairs"]:
        sides, sequences, repeated = (contexts[k] for k in ("sides", "sequences", "repeated_context_tokens"))
        totals.add_row(
            "sides in several generation contexts chosen / rejected",
            f"{sides['chosen']:,} / {sides['rejected']:,} ({sequences['chosen']:,} / {sequences['rejected']:,} sequences)",
        )
        totals.add_row("context tokens computed again for them", f"{repeated['chosen']:,} / {repeated['rejected']:,}")
    layouts = stats["layout_tokens"]
    totals.add_row("tokens computed, sequences alone", f"{layouts['alone']:,}")
    forest = (f"prefix forest, batch {layouts['batch_size']}", "prefix_forest")
    shared = (forest,) if kto else (("prefix-shared", "prefix_sharing"), forest)
    for name, key in shared:
        fewer = f" ({layouts['alone'] / layouts[key]:.2f}× fewer)" if layouts[key] else ""
        totals.add_row(f"  {name}", f"{layouts[key]:,}{fewer}")
    if "tool_calls" in tokens:
        totals.add_row(f"tool calls trained {a} / {b}", f"{tokens['tool_calls'][a]:,} / {tokens['tool_calls'][b]:,}")
    fraction = stats["trained_fraction"]
    totals.add_row(
        f"trained {a} / {b}",
        f"{tokens[f'{a}_trained']:,} ({_pct(fraction[a])}) / {tokens[f'{b}_trained']:,} ({_pct(fraction[b])})",
    )
    return [title, dist, totals]


def _cells(values: dict | None, is_fraction: bool) -> list[str]:
    if values is None:
        return ["-"] * 5
    if is_fraction:
        return [f"{values[k]:.3f}" for k in ("min", "mean", "median", "p95", "max")]
    return [
        f"{values['min']:,}",
        f"{values['mean']:,.1f}",
        f"{values['median']:,.1f}",
        f"{values['p95']:,.1f}",
        f"{values['max']:,}",
    ]


def _int(value) -> str:
    return "-" if value is None else f"{value:,}"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


# ── plot ──────────────────────────────────────────────────────────────────────


def plot_stats(cache: Path, out: Path) -> None:
    """Length histograms, trained fraction per pair and turns per conversation, to one PNG."""
    from mtdpo.plot import pyplot

    plt = pyplot()
    opened = open_cache(cache)
    arrays = per_row_arrays(opened)
    (a, b), unit = groups_of(opened), opened.manifest.unit  # chosen / rejected pairs, desirable / undesirable rows
    turns_key = "turns" if f"{a}_turns" in arrays else "trained_turns"
    fig, (lengths, fraction, turns) = plt.subplots(1, 3, figsize=(16, 4.5))
    longest = max(int(arrays[f"{a}_len"].max(initial=1)), int(arrays[f"{b}_len"].max(initial=1)))
    bins = np.linspace(0, longest, 41)
    for name, key in ((a, f"{a}_len"), (b, f"{b}_len"), ("prompt", "prompt_len")):
        lengths.hist(arrays[key], bins=bins, histtype="step", linewidth=1.6, label=name)
    lengths.set(title="sequence length", xlabel="tokens", ylabel=f"{unit}s")
    lengths.legend()
    if opened.is_kto:  # each row once, at its position in the cache
        positions = {a: np.flatnonzero(arrays["desirable"]), b: np.flatnonzero(~arrays["desirable"])}
    else:
        positions = {a: np.arange(len(arrays["row"])), b: np.arange(len(arrays["row"]))}
    for side, marker in ((a, "o"), (b, "x")):
        fraction.scatter(positions[side], _fraction(arrays, side), s=10, marker=marker, label=side)
    fraction.set(title=f"trained-token fraction per {unit}", xlabel=unit, ylabel="trained / tokens", ylim=(0, 1))
    fraction.legend()
    most = int(max(arrays[f"{a}_{turns_key}"].max(initial=0), arrays[f"{b}_{turns_key}"].max(initial=0)))
    for shift, side in ((-0.2, a), (0.2, b)):
        counts = np.bincount(arrays[f"{side}_{turns_key}"], minlength=most + 1)
        turns.bar(np.arange(most + 1) + shift, counts, width=0.4, label=side)
    label = "turns per conversation" if turns_key == "turns" else "trained assistant turns per conversation"
    turns.set(title=label, xlabel="turns", ylabel=f"{unit}s")
    turns.legend()
    fig.suptitle(f"{cache}: {len(arrays['row']):,} {unit}s")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
