"""Batching: text normalization, tokenization, length buckets and batch formation."""
