"""l2sweep: a tracked, reproducible pipeline for studying regularization in small Keras networks."""

__version__ = "0.1.0"
