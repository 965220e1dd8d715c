"""Name -> backbone registry: ``model.backbone.name`` in a config names an entry here or a timm ViT.

Entries are backbone classes or builder functions, registered with the facts the encoder builder needs before it
builds them: ``tokenizer``, the registered tokenizer the backbone embeds its input with (``image_patches`` for a ViT,
``audio_patches`` for AST, ...; None when it has none); ``flag``, the constructor argument that switches that
tokenizer off when the config names another one (only for backbones that build it eagerly); ``any_tokenizer``,
whether other tokenizers may feed its blocks (a ViT's blocks serve audio patches, tubelets and motion; Point-BERT's
need point groups). Any timm ViT name (``vit_small_patch16_224``, ...) resolves to the ``vit`` entry.

A new backbone is one file with a class deriving from `mmblocks.models.BackboneBase` (or a builder returning one)
decorated with ``@register_backbone("name", tokenizer=...)``, imported by `mmblocks.models`.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from tokenizers_mm.registry import Registry, RegistryError

__all__ = [
    "BACKBONES",
    "builder_args",
    "create_backbone",
    "list_backbones",
    "preset_sizes",
    "register_backbone",
    "resolve_backbone",
]

BACKBONES: Registry[nn.Module] = Registry("backbone")


def register_backbone(
    name: str,
    obj: Callable | None = None,
    *,
    tokenizer: str | None = None,
    flag: str | None = None,
    any_tokenizer: bool = True,
):
    """Register a backbone class or builder as `name` (a decorator without `obj`). `tokenizer`: the tokenizer it
    embeds its input with; `flag`: its constructor argument that turns that tokenizer off (eagerly built ones);
    `any_tokenizer`: whether another tokenizer may feed its blocks."""
    return BACKBONES.register(name, obj, tokenizer=tokenizer, flag=flag, any_tokenizer=any_tokenizer)


def builder_args(entry: str) -> tuple[str, ...]:
    """Constructor arguments of backbone `entry` that the encoder builder sets, not the config: the data's channels
    and the `flag` that switches its own tokenizer off."""
    flag = BACKBONES.info(entry)["flag"]
    return ("in_chans", flag) if flag else ("in_chans",)


def list_backbones() -> list[str]:
    """Registered backbone names (every timm ViT name works too, through ``vit``)."""
    return BACKBONES.names()


@functools.lru_cache(maxsize=1)
def _timm_vits() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models("vit_*") + timm.list_models("deit*") + timm.list_models("eva*"))


def resolve_backbone(name: str) -> tuple[str, dict[str, Any]]:
    """``(registry entry, fixed arguments)`` for a config's backbone name: an entry as is, a timm ViT name as
    ``("vit", {"timm_model": name})``."""
    if name in BACKBONES:
        return name, {}
    if name in _timm_vits():
        return "vit", {"timm_model": name}
    hint = difflib.get_close_matches(name, list_backbones() + sorted(_timm_vits()), n=1)
    more = f"; did you mean {hint[0]!r}?" if hint else ""
    raise RegistryError(f"unknown backbone {name!r}: not one of {list_backbones()} nor a timm ViT name{more}")


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone `name` (an entry or a timm ViT name) with its options."""
    entry, fixed = resolve_backbone(name)
    return BACKBONES.create(entry, **fixed, **kwargs)


def preset_sizes(
    table: dict[str, dict[str, int]], preset: str | None, default: str, what: str, **given: int | None
) -> tuple[int, int, int]:
    """``(embed_dim, depth, num_heads)`` of `preset` in `table` (`default` when None), each replaced by the value in
    `given` unless that is None; an unknown preset is a `ValueError` listing the known ones."""
    if preset is not None and preset not in table:
        raise ValueError(f"unknown {what} preset {preset!r}; presets: {sorted(table)}")
    sizes = table[preset or default]
    return tuple(given[k] if given.get(k) is not None else sizes[k] for k in ("embed_dim", "depth", "num_heads"))
