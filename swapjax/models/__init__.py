"""Flax models of the paper's experiments."""
from .mlpnet import MLPNet

__all__ = ["MLPNet"]
