"""mamba-training: train Mamba language models on AWS spot fleets without losing work."""

__version__ = "0.1.0"
