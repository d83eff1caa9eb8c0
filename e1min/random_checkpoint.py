"""Compatibility module: random E1 weights live in ``e1min.weights``."""

from e1min.weights import random_model, write_random_checkpoint

__all__ = ["random_model", "write_random_checkpoint"]
