"""The `mtdpo` command line: thin commands that parse options and call the library."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mtdpo import __version__
from mtdpo.assets import packaged_templates
from mtdpo.errors import Interrupted, UsageError

app = typer.Typer(
    help="Multi-turn DPO + NLL: preprocess conversations into masked Arrow shards once, train many times.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()


def user_errors(command):
    """Print a UsageError as one line on stderr and exit with code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UsageError as err:
            # escape: a path or reason holding "[...]" is text, not rich markup (it vanished or crashed)
            Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Interrupted as err:  # a checkpoint was saved: say where, exit as a signalled process would
            Console(stderr=True).print(escape(str(err)), highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"mtdpo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Multi-turn DPO + NLL for chat models."""


@app.command()
@user_errors
def preprocess(
    input: Path = typer.Argument(
        ...,
        help="Conversations: .jsonl, .json, .parquet, a saved `datasets` directory, a directory of such files "
        "(read in sorted order), or a `datasets` hub name (streamed).",
        readable=False,  # no click check (a boxed usage message): preprocess says "cannot read" in one line
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Cache directory to write. \\[default: data_cache/<input name>]"
    ),
    tokenizer: Optional[str] = typer.Option(
        None, help="Tokenizer name or path. \\[default: the embedded tiny Gemma-style tokenizer]"
    ),
    chat_template: Optional[Path] = typer.Option(
        None,
        help="Jinja chat template to use instead of the tokenizer's: a FILE, or the NAME of a packaged real template "
        f"({', '.join(packaged_templates())}). \\[default: the tokenizer's own]",
    ),
    max_length: int = typer.Option(
        2048, help="Tokens kept per sequence; longer ones keep the start and lose the tail."
    ),
    max_chars: Optional[int] = typer.Option(
        None,
        help="Characters a row may hold (all its strings together); longer rows are rejected before they are "
        "rendered, since rendering and tokenising cost memory in proportion to the whole row, and truncation "
        "would drop most of it. The reason says what to pass to keep them. \\[default: 64 × --max-length, at least 1,000,000]",
    ),
    render_timeout: float = typer.Option(
        60.0,
        help="Seconds one row may take to render and mask; a slower row is rejected (a chat template that loops), "
        "and the run stops if its first rows all are. 0: no limit.",
    ),
    mask_mode: str = typer.Option(
        "assistant",
        help="assistant: train post-prompt assistant messages only. "
        "seed: the original research rule (mask user turns by marker, train the rest).",
    ),
    user_marker: Optional[str] = typer.Option(
        None, help="seed mode: user-turn start marker. \\[default: from the template family]"
    ),
    end_marker: Optional[str] = typer.Option(
        None, help="seed mode: end-of-turn marker. \\[default: from the template family]"
    ),
    string_arguments: bool = typer.Option(
        False,
        help="Render tool-call arguments given as JSON strings as strings (off: parsed to objects first, as a "
        "chat server does before the template sees them).",
        show_default="off",
    ),
    tools_as_text: bool = typer.Option(
        False,
        help="Write tool calls, tool results and `tools` schemas as text, for chat templates without tool support "
        "(Gemma's): each call a ```python or ```tool_call block in the assistant's text, each result an ```output "
        "user turn, the schemas in the system or first user message (docs/MASKING.md).",
        show_default="off",
    ),
    control_as_text: bool = typer.Option(
        False,
        help="Encode a control token's text written inside a message (`<|im_end|>` in a code sample) as plain text, "
        "the tokens a model writes for those characters (off: such a row is rejected naming the token, as the "
        "tokenizer would encode it as the token and end the turn there).",
        show_default="off",
    ),
    num_proc: int = typer.Option(
        1,
        help="Worker processes, at most the CPUs available and one per 256-row chunk; the output is identical "
        "for any value.",
    ),
    strict: bool = typer.Option(
        False, help="Stop at the first unusable row instead of writing it to rejects.jsonl.", show_default="off"
    ),
    overwrite: bool = typer.Option(
        False,
        help="Replace an existing mtdpo cache at --out (only once the new one is complete); anything else there "
        "(a file, the input, a folder that is not a cache) is refused.",
        show_default="off",
    ),
    format: str = typer.Option("auto", help="Input format: auto (from the file name), jsonl, json, parquet, arrow."),
    max_shard_size: str = typer.Option("500MB", help="Largest Arrow shard written."),
    shard: Optional[str] = typer.Option(
        None,
        help="I/N: process only rows [I*total/N, (I+1)*total/N) of the input (row numbers stay global), "
        "one slice per machine; `mtdpo train --data` takes the N caches together. \\[default: all rows]",
    ),
    split: str = typer.Option("train", help="Split to stream when INPUT is a `datasets` hub name."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary table.", show_default="off"),
    trust_remote_code: bool = typer.Option(
        False,
        help="Allow tokenizer code from the tokenizer's repository to run (off: only transformers' own).",
        show_default="off",
    ),
) -> None:
    """Tokenize and mask conversations once; write Arrow shards that `mtdpo train` memory-maps."""
    from mtdpo import api
    from mtdpo.preprocess.pipeline import NothingKept
    from mtdpo.preprocess.sources import default_output

    out = out or default_output(input, shard)
    try:
        stats = api.preprocess(
            input,
            out,
            tokenizer=tokenizer,
            chat_template=chat_template,
            max_length=max_length,
            max_chars=max_chars,
            render_timeout=render_timeout,
            mask_mode=mask_mode,
            user_marker=user_marker,
            end_marker=end_marker,
            string_arguments=string_arguments,
            tools_as_text=tools_as_text,
            control_as_text=control_as_text,
            num_proc=num_proc,
            strict=strict,
            overwrite=overwrite,
            format=format,
            max_shard_size=max_shard_size,
            shard=shard,
            split=split,
            quiet=quiet,
            trust_remote_code=trust_remote_code,
        )
    except NothingKept as err:  # the counts and reasons of a run that wrote no cache, then its one-line error
        if not quiet:
            Console(stderr=True).print(_summary(err.stats, out))
        raise
    if not quiet:
        console.print(_summary(stats, out))


def _summary(stats: dict, out: Path) -> Table:
    # Reasons quote the input (a role named "[/bold]") and paths may hold brackets: text, not markup.
    table = Table(title=f"preprocess → {escape(str(out))}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name in ("rows", "kept", "rejected", "dropped", "truncated"):
        table.add_row(name, f"{stats[name]:,}")
    for reason, count in stats["reasons"].items():
        table.add_row(f"  {escape(reason)}", f"{count:,}")
    groups = ("desirable", "undesirable") if "desirable" in stats else ("chosen", "rejected")  # a KTO cache's rows
    if groups[0] == "desirable":
        table.add_row("rows (desirable / undesirable)", f"{stats['desirable']:,} / {stats['undesirable']:,}")
    table.add_row(f"tokens ({' / '.join(groups)})", " / ".join(f"{stats[f'{g}_tokens']:,}" for g in groups))
    table.add_row(f"trained ({' / '.join(groups)})", " / ".join(f"{stats[f'{g}_trained_tokens']:,}" for g in groups))
    table.add_row("seconds", f"{stats['seconds']:.2f}")
    table.add_row("rows/s", f"{stats['rows_per_second']:,.1f}")
    return table


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@user_errors
def train(ctx: typer.Context) -> None:
    """Train a model with DPO + NLL on preprocessed caches. `mtdpo train --help` shows the options.

    Options: --data CACHE [CACHE ...] --model M --output-dir DIR [--config configs/X.yaml] [--beta 0.1]
    [--nll-coef 1.0] [--loss-type sigmoid] and every transformers TrainingArguments field
    (`mtdpo train --help-all` lists them).
    """
    if {"-h", "--help"} & set(ctx.args):
        from mtdpo.train.help import print_help

        print_help(console)
        return
    from mtdpo.api import train_config
    from mtdpo.train.run import train as train_model

    args = ["--help" if arg == "--help-all" else arg for arg in ctx.args]  # argparse's full listing
    trainer = train_model(config := train_config(args))
    if trainer.is_world_process_zero():
        console.print(f"saved model and tokenizer to [bold]{config.output_dir}[/]")


@app.command(
    "precompute-ref",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@user_errors
def precompute_ref(ctx: typer.Context) -> None:
    """Store the reference model's log-probs in a cache; training then loads no reference model.

    Usage: mtdpo precompute-ref CACHE [--model M | --ref-model R] [--seed S] [--bf16] [--config X.yaml] [-q]:
    the options of `mtdpo train` that decide the reference's log-probs (`mtdpo precompute-ref --help`).
    """
    from mtdpo.train.help import print_precompute_help

    if {"-h", "--help"} & set(ctx.args) or not ctx.args:
        print_precompute_help(console)
        return
    from mtdpo.api import train_config
    from mtdpo.train.reference import precompute_reference

    cache, *options = ctx.args
    if cache.startswith("-"):
        raise UsageError("precompute-ref takes the cache first: mtdpo precompute-ref CACHE [options]")
    if options and not options[0].startswith("-"):  # --data would take it as a second cache, left untouched
        raise UsageError(
            f"unexpected argument {options[0]!r} after the cache {cache}: precompute-ref takes one cache; run it once per cache"
        )
    quiet = bool({"-q", "--quiet"} & set(options))
    # --batch-size: the name this command has always had for the forward's batch
    options = ["--per-device-eval-batch-size" if arg == "--batch-size" else arg for arg in options]
    config = train_config(["--data", cache, *(arg for arg in options if arg not in ("-q", "--quiet"))])
    manifest = precompute_reference(config, progress=not quiet)
    reference = manifest.reference
    console.print(
        f"stored {reference.precision} reference log-probs of {reference.model} in [bold]{escape(cache)}[/]",
        highlight=False,
        soft_wrap=True,
    )


@app.command("show-sample")
@user_errors
def show_sample(
    cache: Path = typer.Argument(..., help="Cache directory written by `mtdpo preprocess`."),
    index: Optional[int] = typer.Option(
        None,
        "--index",
        "-i",
        help="Which pair (0-based position in the cache); with --search, where the search starts. \\[default: 0]",
    ),
    side: str = typer.Option("both", help="chosen, rejected or both."),
    tokens: bool = typer.Option(
        False, "--tokens", help="Show token boundaries: each token followed by its id.", show_default="off"
    ),
    search: Optional[str] = typer.Option(
        None,
        "--search",
        "-s",
        help="Show the first pair whose chosen or rejected text contains TEXT (ignoring case). \\[default: none]",
    ),
    pick_random: bool = typer.Option(
        False, "--random", help="Show a random pair (a random match with --search).", show_default="off"
    ),
    html: Optional[Path] = typer.Option(
        None,
        "--html",
        help="Write a standalone HTML page (same colours, no network) to FILE instead of printing. \\[default: none]",
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print ids, labels, decoded tokens and turns as JSON for scripts; each side's `sequences` holds "
        "the input_ids and labels of each generation context.",
        show_default="off",
    ),
    every_pair: bool = typer.Option(
        False, "--all", help="Every pair in cache order (with --json: one JSON line per pair).", show_default="off"
    ),
) -> None:
    """Show one cached pair: chosen and rejected by turn, trained tokens green, masked ones grey."""
    from mtdpo import show

    show.show_sample(
        cache,
        index,
        side,
        console,
        search=search,
        pick_random=pick_random,
        with_ids=tokens,
        html_file=html,
        as_json=as_json,
        every_pair=every_pair,
    )


@app.command()
@user_errors
def stats(
    cache: Path = typer.Argument(..., help="Cache directory written by `mtdpo preprocess`."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the numbers as JSON instead of tables.", show_default="off"
    ),
    plot: Optional[Path] = typer.Option(
        None,
        "--plot",
        help="Also draw length histograms, trained fraction per pair and turns to this PNG (needs mtdpo\\[plot]). \\[default: none]",
    ),
    batch_size: int = typer.Option(
        8,
        "--batch-size",
        min=1,
        help="Pairs per micro-batch the tokens-per-layout line assumes (train's --per-device-train-batch-size).",
    ),
) -> None:
    """Rows, turns, lengths, trained-token fraction, truncation and reject reasons of a cache."""
    from mtdpo import stats as cache_stats

    numbers = cache_stats.cache_stats(cache, batch_size)
    if plot is not None:
        cache_stats.plot_stats(cache, plot)
    if as_json:
        json.dump(numbers, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return
    title, *tables = cache_stats.stats_tables(numbers)
    console.print(title, soft_wrap=True)
    for table in tables:
        console.print(table)
    if plot is not None:
        console.print(f"wrote {plot}", highlight=False)


@app.command()
@user_errors
def plot(
    run: Path = typer.Argument(..., help="Run folder of `mtdpo train` (holds metrics.jsonl), or a metrics.jsonl file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write. \\[default: RUN/curves.png]"),
) -> None:
    """Draw loss, reward margins and accuracy (KTO: KL) curves of a training run to a PNG (needs mtdpo\\[plot])."""
    from mtdpo.plot import plot_run

    out = out or (run if run.is_dir() else run.parent) / "curves.png"
    drawn = plot_run(run, out)
    margin, accuracy = drawn.get("rewards/margins"), drawn.get("rewards/accuracies")
    detail = f": margin {margin[0]:+.3f} → {margin[1]:+.3f}" if margin else ""
    detail += f", accuracy {accuracy[0]} → {accuracy[1]}" if accuracy else ""  # "0.50" or "tie"
    detail += f", kl {drawn['kl'][0]:.3f} → {drawn['kl'][1]:.3f}" if "kl" in drawn else ""  # a KTO run
    console.print(f"wrote {out}{detail}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def pairs(
    rollouts: Path = typer.Argument(
        ...,
        help="Graded rollouts: a .jsonl file or a directory of them (read in sorted order; a problem's rows may "
        "sit in several files). One trajectory per row: prompt_id (or idx), messages, reward (or score, or correct).",
        readable=False,  # no click check (a boxed usage message): pairs says "input not found" in one line
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="Pairs to write (.jsonl, read by `mtdpo preprocess`); rejects go to OUT.rejects.jsonl. "
        "\\[default: ROLLOUTS.pairs.jsonl (.kto.jsonl with --kto) beside the input]",
    ),
    rule: str = typer.Option(
        "random",
        help="random: per problem one random correct vs one random incorrect trajectory (the paper's rule). "
        "max-min: highest vs lowest reward. all: every better × worse pair.",
    ),
    kto: bool = typer.Option(
        False,
        "--kto",
        help="Write unpaired KTO rows {prompt_id, messages, label, reward} instead: each trajectory the rule "
        "pairs, once, desirable when correct. With --rule random that is the paper's KTO data, one desirable and one "
        "undesirable per problem (balanced); --rule all is not balanced: the summary counts each label, weigh them with "
        "KTO's desirable_weight / undesirable_weight.",
        show_default="off",
    ),
    seed: int = typer.Option(
        42,
        help="Seed of the random choices; each problem draws from (seed, prompt_id), so the output does not depend on row or file order.",
    ),
    correct_threshold: float = typer.Option(
        0.5, help="A trajectory is correct when its reward is above this (booleans count as 1 and 0)."
    ),
    min_margin: float = typer.Option(0.0, help="Make no pair whose rewards differ by less (for real-valued rewards)."),
    max_pairs_per_prompt: Optional[int] = typer.Option(
        None, help="--rule all: at most this many pairs per problem, drawn under the seed. \\[default: every pair]"
    ),
    min_messages: int = typer.Option(
        4,
        help="Drop trajectories with fewer messages, system ones not counted (paper: 4, a question, one code run and an answer; 0: off).",
    ),
    end_with_assistant: bool = typer.Option(
        True,
        help="Drop trajectories that do not end with an assistant message (cut off after a tool output; "
        "the paper's 'even number of messages'). On by default, as in the paper.",
    ),
    require_code: bool = typer.Option(
        True,
        help="Drop trajectories with an assistant turn before the last message that runs no code "
        "(no tool call and no ```python block). On by default, as in the paper.",
    ),
    drop_tool_errors: bool = typer.Option(
        True,
        help='Drop trajectories whose last tool output contains "error": a final answer after a failed run is a '
        "guess. On by default, as in the paper.",
    ),
    dedup: bool = typer.Option(
        True,
        help="Keep one of the trajectories of a problem whose assistant turns are identical. On by default, as in the paper.",
    ),
    strict: bool = typer.Option(
        False, help="Stop at the first unusable row instead of writing it to OUT.rejects.jsonl.", show_default="off"
    ),
    overwrite: bool = typer.Option(
        False, help="Replace an existing OUT (only once the new one is complete).", show_default="off"
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the summary as JSON instead of a table.", show_default="off"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing.", show_default="off"),
) -> None:
    """Make preference pairs (or KTO rows) from graded multi-turn rollouts, as in the paper's iterative round."""
    from mtdpo.pairs import PairOptions, default_output, make_pairs_file, summary_table

    options = PairOptions(
        rule=rule,
        seed=seed,
        correct_threshold=correct_threshold,
        min_margin=min_margin,
        max_pairs_per_prompt=max_pairs_per_prompt,
        min_messages=min_messages,
        end_with_assistant=end_with_assistant,
        require_code=require_code,
        drop_tool_errors=drop_tool_errors,
        dedup=dedup,
        kto=kto,
    )
    numbers = make_pairs_file(
        rollouts, out or default_output(rollouts, kto), options, strict=strict, overwrite=overwrite
    )
    if as_json:
        json.dump(numbers, sys.stdout, indent=2, ensure_ascii=False)
        print()
    elif not quiet:
        console.print(summary_table(numbers))


if __name__ == "__main__":
    app()
