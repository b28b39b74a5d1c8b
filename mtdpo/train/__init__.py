"""Stage two: train from the shards. Never calls a tokenizer."""
