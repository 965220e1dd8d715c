"""The registry of offline datasets: ``mmblocks shards make NAME`` and ``data.dataset: NAME`` name a maker here.

A dataset is one file with a maker ``make_x(out, seed=0, **options) -> index`` decorated with
``@register_dataset("x")`` and imported by `mmblocks.data`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tokenizers_mm.registry import Registry, RegistryError

from .shards import ShardWriteError

__all__ = ["DATASETS", "list_datasets", "make_dataset", "register_dataset"]

DATASETS: Registry[dict[str, Any]] = Registry("dataset")


def register_dataset(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a dataset maker ``fn(out, seed=0, **options) -> index.json contents`` available as `name`."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names of the offline datasets."""
    return DATASETS.names()


def make_dataset(name: str, out: str | os.PathLike, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """``mmblocks shards make NAME --out DIR [--seed S]``: write an offline dataset (`list_datasets`).

    `kwargs` go to the maker (`make_digits`, `make_textures`, `make_meshes`, `make_keywords`, `make_moving_digits`;
    e.g. ``max_count``, ``crops_per_class``, ``samples_per_class``, ``progress``); an option the maker does not take
    is a `ShardWriteError` that lists the ones it does. Returns the ``index.json`` contents.
    """
    if name not in DATASETS:
        raise ShardWriteError(f"unknown dataset {name!r} (built in: {', '.join(list_datasets())})")
    try:
        DATASETS.check_kwargs(name, kwargs, given=("out", "seed"))
    except RegistryError as err:
        raise ShardWriteError(str(err)) from None
    return DATASETS.get(name)(out, seed=seed, **kwargs)
