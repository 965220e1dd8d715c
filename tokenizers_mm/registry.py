"""Name -> constructor registries, so configs name components (tokenizers here, adapters in `adapters`, backbones,
heads, tasks, datasets and codecs in `mmblocks`), never import paths.

A `Registry` holds classes or builder functions under names, with optional facts about each entry (`info`), and
checks keyword arguments against the constructor's signature before calling it, so a misspelt option is an error
that names the component and the options it takes instead of a `TypeError` from deep inside.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from torch import nn

__all__ = [
    "Registry",
    "RegistryArgumentError",
    "RegistryError",
    "register_tokenizer",
    "create_tokenizer",
    "list_tokenizers",
    "register_detokenizer",
    "create_detokenizer",
    "list_detokenizers",
]

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown component name, or keyword arguments its constructor does not take."""


class RegistryArgumentError(RegistryError, TypeError):
    """Keyword arguments a registered constructor does not take (a `TypeError` too, as Python's own would be)."""


def _did_you_mean(word: str, choices: list[str]) -> str:
    hint = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


class Registry(Generic[T]):
    """Registered constructors of one kind of component (`kind` names it in error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: Callable[..., T] | None = None, **info: Any) -> Any:
        """Register `obj` (a class or a builder function) as `name`; without `obj`, a decorator. `info` holds facts
        about the entry that must be known before building it (e.g. a backbone's own tokenizer)."""

        def wrap(target: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = target
            self._info[name] = dict(info)
            return target

        return wrap(obj) if obj is not None else wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> Callable[..., T]:
        return self.get(name)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; registered: {self.names()}{_did_you_mean(str(name), self.names())}"
            )
        return self._entries[name]

    def info(self, name: str) -> dict[str, Any]:
        """The facts registered with `name` (empty when none)."""
        self.get(name)
        return dict(self._info[name])

    def parameters(self, name: str, skip: tuple[str, ...] = ()) -> dict[str, inspect.Parameter]:
        """The keyword parameters of `name`'s constructor, without `skip` and ``*args`` / ``**kwargs``."""
        params = inspect.signature(self.get(name)).parameters
        keep = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {n: p for n, p in params.items() if p.kind in keep and n not in skip}

    def check_kwargs(self, name: str, kwargs: Mapping[str, Any], given: tuple[str, ...] = ()) -> None:
        """Raise `RegistryError` when `kwargs` hold a key the constructor of `name` does not take (unless it takes
        ``**kwargs``) or a key in `given` (arguments the caller sets itself)."""
        params = inspect.signature(self.get(name)).parameters
        open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        allowed = sorted(n for n in self.parameters(name) if n not in given)
        for key in kwargs:
            if key in given:
                raise RegistryArgumentError(f"{self.kind} {name!r}: {key!r} is set by the builder, not by the caller")
            if key not in params and not open_kwargs:
                raise RegistryArgumentError(
                    f"{self.kind} {name!r} takes no option {key!r}; it takes {allowed}{_did_you_mean(key, allowed)}"
                )

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Build `name` with `args` and `kwargs`, after checking the keyword names against its signature."""
        self.check_kwargs(name, kwargs)
        return self.get(name)(*args, **kwargs)


TOKENIZERS: Registry[nn.Module] = Registry("tokenizer")


def register_tokenizer(name: str) -> Callable[[type], type]:
    """Class decorator: make a tokenizer available to `create_tokenizer(name, **kwargs)`."""
    return TOKENIZERS.register(name)


def list_tokenizers() -> list[str]:
    """Registered tokenizer names."""
    return TOKENIZERS.names()


def create_tokenizer(name: str, **kwargs: Any) -> nn.Module:
    """Build the tokenizer registered as `name` with its constructor arguments."""
    return TOKENIZERS.create(name, **kwargs)


DETOKENIZERS: Registry[nn.Module] = Registry("detokenizer")


def register_detokenizer(name: str) -> Callable[[type], type]:
    """Class decorator: make a detokenizer (`Tokens` -> raw modality) available to `create_detokenizer(name, **kw)`."""
    return DETOKENIZERS.register(name)


def list_detokenizers() -> list[str]:
    """Registered detokenizer names."""
    return DETOKENIZERS.names()


def create_detokenizer(name: str, **kwargs: Any) -> nn.Module:
    """Build the detokenizer registered as `name` with its constructor arguments."""
    return DETOKENIZERS.create(name, **kwargs)
