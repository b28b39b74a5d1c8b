"""The Python API, for notebooks and pipelines: the commands of the CLI as functions, with the
same arguments (the CLI is a thin layer over them: mtdpo/cli.py).

    from mtdpo import preprocess, train, open_cache

    stats = preprocess("data.jsonl", "data_cache/math", tokenizer="google/gemma-3-270m-it")
    trainer = train("data_cache/math", model="google/gemma-3-270m-it", output_dir="runs/x", max_steps=10)
    cache = open_cache("data_cache/math")

`mtdpo.preprocess` and `mtdpo.train` are also the packages of the two stages; calling them calls
the functions below (`callable_package`), so `import mtdpo` stays cheap and the packages' modules
import as before. A user error raises mtdpo.errors.UsageError with the CLI's one-line message.
Nothing here imports torch, transformers or datasets before it is called.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
from pathlib import Path


def preprocess(
    input: str | Path,
    out: str | Path | None = None,
    *,
    tokenizer: str | None = None,
    chat_template: str | Path | None = None,
    max_length: int = 2048,
    max_chars: int | None = None,
    render_timeout: float = 60.0,
    mask_mode: str = "assistant",
    user_marker: str | None = None,
    end_marker: str | None = None,
    string_arguments: bool = False,
    tools_as_text: bool = False,
    control_as_text: bool = False,
    num_proc: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    format: str = "auto",
    max_shard_size: str = "500MB",
    shard: str | None = None,
    split: str = "train",
    quiet: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """`mtdpo preprocess INPUT`: write the cache (default data_cache/<input name>) and return its
    stats (rows, kept, rejected, reasons, token totals …; also in OUT/stats.json). `quiet`: no
    progress bar. Options as `mtdpo preprocess --help` describes them."""
    from mtdpo.preprocess.pipeline import preprocess as run
    from mtdpo.preprocess.records import MaskOptions
    from mtdpo.preprocess.sources import default_output

    input = Path(input)
    options = MaskOptions(
        mask_mode, max_length, user_marker, end_marker, string_arguments, tools_as_text, control_as_text
    )
    return run(
        input,
        Path(out) if out is not None else default_output(input, shard),
        tokenizer=tokenizer,
        chat_template=Path(chat_template) if chat_template is not None else None,
        options=options,
        num_proc=num_proc,
        strict=strict,
        overwrite=overwrite,
        fmt=format,
        max_shard_size=max_shard_size,
        progress=not quiet,
        trust_remote_code=trust_remote_code,
        split=split,
        shard=shard,
        max_chars=max_chars,
        render_timeout=render_timeout,
    )


def train(data: str | Path | list | None = None, *, config: str | Path | None = None, **options):
    """`mtdpo train --data DATA`: train on one cache or a list of them and return the finished
    transformers Trainer (`trainer.model`, `trainer.state.log_history`). `config` is a YAML file as
    --config takes; every other option of `mtdpo train --help-all` is a keyword argument with
    underscores (`nll_coef=0.5`, `output_dir="runs/x"`, `max_steps=10`), parsed exactly as the
    command line parses it, so the defaults, the YAML merge and the error messages are the same."""
    from mtdpo.train.run import train as run

    return run(train_config(train_arguments(data, config, options)))


def open_cache(path: str | Path, verify: bool = False):
    """A cache, memory-mapped: `len(cache)`, `cache.manifest`, `cache.record(i)`, `cache.dataset`
    (a datasets.Dataset of its columns). `verify`: re-hash the files that changed since written."""
    from mtdpo.cache import open_cache as open_one

    return open_one(Path(path), verify)


def train_arguments(data, config, options: dict) -> list[str]:
    """The command-line arguments that say what the keyword arguments say."""
    args = []
    for name, value in {"data": data, "config": config, **options}.items():
        if value is None:  # the option's default
            continue
        flag = f"--{name}"
        if isinstance(value, bool):
            args += [flag, str(value).lower()]
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def train_config(args: list[str]):
    """`mtdpo train`'s options parsed (also what precompute-ref reads), with each unknown option
    or stray argument explained in one line."""
    from mtdpo.errors import UsageError
    from mtdpo.train.config import parse_train_args

    try:
        return parse_train_args(args)
    except ValueError as err:
        from dataclasses import fields

        from mtdpo.suggest import explain_unknown_options
        from mtdpo.train.config import MtdpoConfig

        names = [f.name for f in fields(MtdpoConfig)] + ["config"]
        raise UsageError(explain_unknown_options(str(err).splitlines()[0], names, args)) from None


class CallablePackage(types.ModuleType):
    """A stage's package that is also its API function: `from mtdpo import preprocess` gives the
    package mtdpo.preprocess (Python binds a subpackage to its parent's attribute of the same
    name, so a function there would be replaced by it), and calling it runs the function."""

    def __call__(self, *args, **kwargs):
        return _function_of(self)(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # what help() and notebooks show for the call
        return inspect.signature(_function_of(self))


def _function_of(package: types.ModuleType):
    return globals()[package.__name__.rsplit(".", 1)[1]]


def callable_package(name: str) -> None:
    """Make the package `name` (mtdpo.preprocess or mtdpo.train) call its API function."""
    sys.modules[name].__class__ = CallablePackage
