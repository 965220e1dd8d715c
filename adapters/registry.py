"""Name -> adapter class registry: configs name adapters (`linear`, `mlp`, ...), never import paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .base import Adapter

__all__ = ["register_adapter", "create_adapter", "list_adapters"]

_ADAPTERS: dict[str, Callable[..., Adapter]] = {}
T = TypeVar("T")


def register_adapter(name: str) -> Callable[[T], T]:
    """Class decorator: make an adapter available to `create_adapter(name, in_dim, out_dim, **kwargs)`."""

    def wrap(cls: T) -> T:
        if name in _ADAPTERS:
            raise ValueError(f"adapter {name!r} is already registered")
        _ADAPTERS[name] = cls  # type: ignore[assignment]
        return cls

    return wrap


def list_adapters() -> list[str]:
    """Registered adapter names."""
    return sorted(_ADAPTERS)


def create_adapter(name: str, in_dim: int, out_dim: int, **kwargs: Any) -> Adapter:
    """Build the adapter `name` projecting ``in_dim`` -> ``out_dim`` tokens."""
    if name not in _ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; registered: {list_adapters()}")
    if not (isinstance(in_dim, int) and in_dim > 0 and isinstance(out_dim, int) and out_dim > 0):
        raise ValueError(f"adapter widths must be positive ints, got in_dim={in_dim!r}, out_dim={out_dim!r}")
    try:
        return _ADAPTERS[name](in_dim, out_dim, **kwargs)
    except TypeError as err:
        raise TypeError(f"adapter {name!r}: {err}") from err
