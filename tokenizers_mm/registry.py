"""Name -> tokenizer class registry, so configs name tokenizers, never import paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["register_tokenizer", "create_tokenizer", "list_tokenizers"]

_TOKENIZERS: dict[str, Callable[..., nn.Module]] = {}
T = TypeVar("T")


def register_tokenizer(name: str) -> Callable[[T], T]:
    """Class decorator: make a tokenizer available to `create_tokenizer(name, **kwargs)`."""

    def wrap(cls: T) -> T:
        if name in _TOKENIZERS:
            raise ValueError(f"tokenizer {name!r} is already registered")
        _TOKENIZERS[name] = cls  # type: ignore[assignment]
        return cls

    return wrap


def list_tokenizers() -> list[str]:
    """Registered tokenizer names."""
    return sorted(_TOKENIZERS)


def create_tokenizer(name: str, **kwargs: Any) -> nn.Module:
    """Build the tokenizer registered as `name` with its constructor arguments."""
    if name not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; registered: {list_tokenizers()}")
    return _TOKENIZERS[name](**kwargs)
