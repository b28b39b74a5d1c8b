"""Stage one: read → render + mask → truncate → write shards. May import tokenizers.

Called, the package runs stage one: `from mtdpo import preprocess; preprocess("data.jsonl")`
(mtdpo/api.py).
"""

from mtdpo.api import callable_package

callable_package(__name__)
