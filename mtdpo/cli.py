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
from mtdpo.errors import UsageError

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

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"mtdpo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Multi-turn DPO + NLL for chat models."""


@app.command()
@user_errors
def preprocess(
    input: Path = typer.Argument(..., help="Conversations: .jsonl, .json, .parquet, or a saved `datasets` directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache directory to write. \\[default: data_cache/<input name>]"),
    tokenizer: Optional[str] = typer.Option(
        None, help="Tokenizer name or path. \\[default: the embedded tiny Gemma-style tokenizer]"
    ),
    chat_template: Optional[Path] = typer.Option(None, help="Jinja chat template file to use instead of the tokenizer's."),
    max_length: int = typer.Option(2048, help="Tokens kept per sequence; longer ones keep the start and lose the tail."),
    mask_mode: str = typer.Option(
        "assistant",
        help="assistant: train post-prompt assistant messages only. "
        "seed: the original research rule (mask user turns by marker, train the rest).",
    ),
    user_marker: Optional[str] = typer.Option(None, help="seed mode: user-turn start marker. \\[default: from the template family]"),
    end_marker: Optional[str] = typer.Option(None, help="seed mode: end-of-turn marker. \\[default: from the template family]"),
    num_proc: int = typer.Option(1, help="Worker processes; the output is identical for any value."),
    strict: bool = typer.Option(False, help="Stop at the first unusable row instead of writing it to rejects.jsonl."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory (only once the new one is complete)."),
    format: str = typer.Option("auto", help="Input format: auto (from the file name), jsonl, json, parquet, arrow."),
    max_shard_size: str = typer.Option("500MB", help="Largest Arrow shard written."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary table."),
) -> None:
    """Tokenize and mask conversations once; write Arrow shards that `mtdpo train` memory-maps."""
    from mtdpo.preprocess.encode import MaskOptions
    from mtdpo.preprocess.pipeline import preprocess as run

    out = out or Path("data_cache") / input.stem
    options = MaskOptions(mask_mode, max_length, user_marker, end_marker)
    stats = run(
        input, out, tokenizer=tokenizer, chat_template=chat_template, options=options, num_proc=num_proc,
        strict=strict, overwrite=overwrite, fmt=format, max_shard_size=max_shard_size, progress=not quiet,
    )  # fmt: skip
    if not quiet:
        console.print(_summary(stats, out))


def _summary(stats: dict, out: Path) -> Table:
    table = Table(title=f"preprocess → {out}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name in ("rows", "kept", "rejected", "dropped", "truncated"):
        table.add_row(name, f"{stats[name]:,}")
    for reason, count in stats["reasons"].items():
        table.add_row(f"  {reason}", f"{count:,}")
    table.add_row("tokens (chosen / rejected)", f"{stats['chosen_tokens']:,} / {stats['rejected_tokens']:,}")
    table.add_row("trained (chosen / rejected)", f"{stats['chosen_trained_tokens']:,} / {stats['rejected_trained_tokens']:,}")
    table.add_row("seconds", f"{stats['seconds']:.2f}")
    table.add_row("rows/s", f"{stats['rows_per_second']:,.1f}")
    return table


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@user_errors
def train(ctx: typer.Context) -> None:
    """Train a model with DPO + NLL on preprocessed caches. `mtdpo train --help` lists every option.

    Options: --data CACHE [CACHE ...] --model M --output-dir DIR [--config configs/X.yaml] [--beta 0.1]
    [--nll-coef 1.0] [--loss-type sigmoid|ipo|hinge|robust] and every transformers TrainingArguments field
    (--learning-rate, --max-steps, --per-device-train-batch-size, --bf16, --resume-from-checkpoint auto …).
    """
    from trl import TrlParser

    from mtdpo.train.config import MtdpoConfig
    from mtdpo.train.run import train as run

    parser = TrlParser([MtdpoConfig], prog="mtdpo train", description="Train with multi-turn DPO + NLL on mtdpo caches.")
    try:
        (config,) = parser.parse_args_and_config(ctx.args)
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    trainer = run(config)
    if trainer.is_world_process_zero():
        console.print(f"saved model and tokenizer to [bold]{config.output_dir}[/]")


@app.command("show-sample")
@user_errors
def show_sample(
    cache: Path = typer.Argument(..., help="Cache directory written by `mtdpo preprocess`."),
    index: int = typer.Option(0, "--index", "-i", help="Which pair (0-based position in the cache)."),
    side: str = typer.Option("both", help="chosen, rejected or both."),
    as_json: bool = typer.Option(False, "--json", help="Print ids, labels and decoded tokens as JSON for scripts."),
) -> None:
    """Show one cached pair with trained tokens highlighted, to check a mask by eye."""
    from mtdpo import show

    if as_json:
        pair, tokenizer = show.load_pair(cache, index)
        sides = show.sides_of(side)
        json.dump(show.pair_as_json(pair, tokenizer, index, sides), sys.stdout, ensure_ascii=False)
        print()
    else:
        show.show_sample(cache, index, side, console)


if __name__ == "__main__":
    app()
