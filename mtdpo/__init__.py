"""mtdpo: multi-turn DPO + NLL. Tokenize once into masked Arrow shards, train many times."""

__version__ = "0.1.0"
