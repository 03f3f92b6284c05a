"""The WebDataset tar format: export a corpus to tar shards (``export``), their ``index``, read samples back
(``read``) and check an export (``verify``). "Shard" in this package means one tar file."""
