"""Ray Tune fan-out of fine-tuning jobs."""
