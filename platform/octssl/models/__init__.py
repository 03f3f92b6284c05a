"""Models: the FPN and its baselines behind one registry."""
