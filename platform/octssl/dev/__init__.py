"""Development-only helpers (a local S3 server for tests, benchmarks and the quick start); never used by the product."""
