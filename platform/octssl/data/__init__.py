"""Data: corpus format, synthetic corpora, shards, sources, transforms."""
