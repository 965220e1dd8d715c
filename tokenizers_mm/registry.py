"""Name -> class registries, so configs name components (tokenizers here, adapters in `adapters`), never import
paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from torch import nn

__all__ = ["Registry", "register_tokenizer", "create_tokenizer", "list_tokenizers"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Registered constructors of one kind of component (`kind` names it in error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: make the class available as `name`."""

        def wrap(cls: type) -> type:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = cls
            return cls

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
        return self._entries[name]


TOKENIZERS: Registry[nn.Module] = Registry("tokenizer")


def register_tokenizer(name: str) -> Callable[[type], type]:
    """Class decorator: make a tokenizer available to `create_tokenizer(name, **kwargs)`."""
    return TOKENIZERS.register(name)


def list_tokenizers() -> list[str]:
    """Registered tokenizer names."""
    return TOKENIZERS.names()


def create_tokenizer(name: str, **kwargs: Any) -> nn.Module:
    """Build the tokenizer registered as `name` with its constructor arguments."""
    return TOKENIZERS.get(name)(**kwargs)
