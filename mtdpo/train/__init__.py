"""Stage two: train on the cache, never calling a tokenizer (docs/DESIGN.md).

Called, the package trains: `from mtdpo import train; train("data_cache/x", max_steps=10)`
(mtdpo/api.py).
"""

import os as _os

import torch as _torch

# DeepSpeed announces "Setting accelerator to CPU" at import when it finds no GPU, on every run and
# every rank: nothing the user can act on. Naming the accelerator before anything imports DeepSpeed
# makes it say so at its info level, which it does not print.
if not _torch.cuda.is_available():
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")

from mtdpo.api import callable_package  # noqa: E402  (after DS_ACCELERATOR is set)

callable_package(__name__)
