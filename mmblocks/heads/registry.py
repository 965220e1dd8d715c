"""Name -> head registry: a config names its head (``model.head.name``), never an import path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from tokenizers_mm.registry import Registry

__all__ = ["HEADS", "create_head", "list_heads", "register_head"]

HEADS: Registry[nn.Module] = Registry("head")


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator: make a head ``cls(in_dim, **options)`` available to `create_head(name, in_dim, ...)`."""
    return HEADS.register(name)


def list_heads() -> list[str]:
    """Registered head names."""
    return HEADS.names()


def create_head(name: str, in_dim: int, **kwargs: Any) -> nn.Module:
    """Build the head `name` on tokens of width `in_dim`."""
    HEADS.check_kwargs(name, kwargs, given=("in_dim",))
    return HEADS.get(name)(in_dim, **kwargs)
