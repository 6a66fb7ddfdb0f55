"""bigbatch: distributed large-batch training for GPU clusters."""

__version__ = "0.1.0"
