"""Datasets, training, evaluation and metrics for the disc classifier."""
