"""flatcli: relative flatness and friends for PyTorch models."""

__version__ = "0.1.0"
