"""Task heads on top of `Tokens`."""

from .classification import POOLING, ClassifierHead

__all__ = ["POOLING", "ClassifierHead"]
