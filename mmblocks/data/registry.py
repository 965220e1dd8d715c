"""The registry of offline datasets: ``mmblocks shards make NAME`` and ``data.dataset: NAME`` name a maker here.

A dataset is one file with a maker ``make_x(out, seed=0, **options) -> index`` decorated with
``@register_dataset("x")`` and imported by `mmblocks.data`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers_mm.registry import Registry, RegistryError

from .schema import read_index
from .shards import ShardWriteError

__all__ = ["DATASETS", "list_datasets", "make_dataset", "register_dataset"]

DATASETS: Registry[dict[str, Any]] = Registry("dataset")


def register_dataset(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a dataset maker ``fn(out, seed=0, **options) -> index.json contents`` available as `name`."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names of the offline datasets."""
    return DATASETS.names()


def make_dataset(
    name: str, out: str | os.PathLike, seed: int = 0, *, overwrite: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """``mmblocks shards make NAME --out DIR [--seed S] [--overwrite]``: write an offline dataset (`list_datasets`);
    a folder that already holds one (an ``index.json``) is refused unless `overwrite`.

    `kwargs` go to the maker (`make_digits`, `make_textures`, `make_meshes`, `make_keywords`, `make_moving_digits`;
    e.g. ``max_count``, ``crops_per_class``, ``samples_per_class``, ``progress``); an option the maker does not take
    is a `ShardWriteError` that lists the ones it does. Returns the ``index.json`` contents.
    """
    if name not in DATASETS:
        raise ShardWriteError(f"unknown dataset {name!r} (built in: {', '.join(list_datasets())})")
    existing = read_index(out) if Path(out).is_dir() else None
    if existing is not None and not overwrite:
        splits = ", ".join(f"{k} {v.num_samples}" for k, v in sorted(existing.splits.items()))
        raise ShardWriteError(
            f"{out} already holds a dataset (index.json: {splits or 'no splits'}): pass overwrite=True "
            "(--overwrite) to replace it, or choose another folder"
        )
    try:
        DATASETS.check_kwargs(name, kwargs, given=("out", "seed"))
    except RegistryError as err:
        raise ShardWriteError(str(err)) from None
    return DATASETS.get(name)(out, seed=seed, **kwargs)
