"""Watching runs: Prometheus metrics, terminal progress, plots."""
