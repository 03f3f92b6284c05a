"""Device-file ingest: one reader module per device family plus the append pipeline."""
