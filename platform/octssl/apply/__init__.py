"""Applying a trained model: the Predictor, segmentation metrics, bundles, predict, growth."""
