"""Name -> adapter class registry: configs name adapters (`linear`, `mlp`, ...), never import paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenizers_mm.registry import Registry

from .base import Adapter

__all__ = ["register_adapter", "create_adapter", "list_adapters"]

ADAPTERS: Registry[Adapter] = Registry("adapter")


def register_adapter(name: str) -> Callable[[type], type]:
    """Class decorator: make an adapter available to `create_adapter(name, in_dim, out_dim, **kwargs)`."""
    return ADAPTERS.register(name)


def list_adapters() -> list[str]:
    """Registered adapter names."""
    return ADAPTERS.names()


def create_adapter(name: str, in_dim: int, out_dim: int, **kwargs: Any) -> Adapter:
    """Build the adapter `name` projecting ``in_dim`` -> ``out_dim`` tokens."""
    ADAPTERS.check_kwargs(name, kwargs, given=("in_dim", "out_dim"))  # an unknown name or option first
    if not (isinstance(in_dim, int) and in_dim > 0 and isinstance(out_dim, int) and out_dim > 0):
        raise ValueError(f"adapter widths must be positive ints, got in_dim={in_dim!r}, out_dim={out_dim!r}")
    return ADAPTERS.get(name)(in_dim, out_dim, **kwargs)
