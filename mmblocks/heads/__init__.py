"""Heads on top of `Tokens`, registered by name (`create_head`, `list_heads`)."""

from .classification import POOLING, ClassifierHead, Pooling
from .registry import HEADS, create_head, list_heads, register_head

__all__ = ["HEADS", "POOLING", "ClassifierHead", "Pooling", "create_head", "list_heads", "register_head"]
