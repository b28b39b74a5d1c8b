"""mtdpo: multi-turn DPO + NLL. Tokenize once into masked Arrow shards, train many times.

    from mtdpo import preprocess, train, open_cache   # the Python API (mtdpo/api.py)

Importing mtdpo loads nothing heavy: each name is loaded on first use.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["open_cache", "preprocess", "train"]


def __getattr__(name: str):
    if name in ("preprocess", "train"):  # the stage's package, which calls the API function (api.py)
        return importlib.import_module(f"mtdpo.{name}")
    if name == "open_cache":
        from mtdpo.api import open_cache

        return open_cache
    raise AttributeError(f"module 'mtdpo' has no attribute {name!r}")
