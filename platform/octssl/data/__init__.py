"""Training input: the one training-data interface (``feed``), the sources it reads (``sources``: ZarrSource
over a corpus, StreamSource over WebDataset shards), the epoch plan (``plan``) and the transforms."""
