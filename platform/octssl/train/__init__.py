"""Training: DeepSpeed engine, the one loop, the Ray launcher, checkpoints."""
