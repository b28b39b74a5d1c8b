"""Stage one: read → render + mask → truncate → write shards. May import tokenizers."""
