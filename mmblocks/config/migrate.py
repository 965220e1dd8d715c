"""Config keys and values renamed since earlier releases, rewritten into today's with a warning naming the new key."""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["ConfigDeprecationWarning", "migrate"]


class ConfigDeprecationWarning(FutureWarning):
    """A renamed config key or value was used: the config still loads; the message names the new key."""


def _deprecated(old: str, new: str) -> None:
    # stacklevel: _deprecated -> migrate -> validate_config -> load_config -> its caller
    warnings.warn(f"config key {old} is deprecated: {new}", ConfigDeprecationWarning, stacklevel=5)


def _backbone_entry(name: str | None) -> tuple[str, dict[str, Any]]:
    from ..models import BACKBONES, resolve_backbone
    from .schema import backbone_default

    entry, fixed = resolve_backbone(name or backbone_default())
    return entry, {**BACKBONES.info(entry), "params": BACKBONES.parameters(entry, skip=tuple(fixed))}


def _fit_old_backbone(backbone: dict[str, Any]) -> list[str]:
    """A saved config of the old flat backbone schema holds every backbone's keys: drop those this backbone does not
    take, and nulls that meant "the backbone's default" where its constructor takes no null. Returns what went."""
    from tokenizers_mm.registry import RegistryError

    try:
        _, info = _backbone_entry(backbone.get("name"))
    except RegistryError:  # an unknown name: validation reports it
        return []
    params = info["params"]
    dropped = [
        k
        for k, v in backbone.items()
        if k != "name" and (k not in params or (v is None and params[k].default is not None))
    ]
    for k in dropped:
        del backbone[k]
    return dropped


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Rewrite keys and values renamed since earlier releases into today's, with a `ConfigDeprecationWarning`
    naming the new key for each."""
    model = raw.get("model")
    if isinstance(model, dict):
        backbone = model.get("backbone")
        if isinstance(backbone, dict) and "type" in backbone:
            kind = backbone.pop("type")
            if kind != "vit":  # the old flat schema's `name` was the timm name, which only `vit` used
                backbone.pop("name", None)
                backbone["name"] = kind
            dropped = _fit_old_backbone(backbone)
            _deprecated(
                "model.backbone.type",
                f"name the backbone with model.backbone.name (here {backbone.get('name') or 'the default'}; a "
                "registered backbone or a timm ViT name)"
                + (f"; keys it does not take were dropped: {dropped}" if dropped else ""),
            )
        tokenizer = model.get("tokenizer")
        if isinstance(tokenizer, dict) and tokenizer.get("name") == "image_patches_cls_last":
            name = backbone.get("name") if isinstance(backbone, dict) else backbone
            _, info = _backbone_entry(name if isinstance(name, str) else None)
            if not info["any_tokenizer"]:  # a causal ViT: its own patch embedding, cls last by default
                tokenizer["name"] = None
            else:  # a ViT: its own patch embedding with the class token moved last
                tokenizer["name"] = "image_patches"
                tokenizer["kwargs"] = {**(tokenizer.get("kwargs") or {}), "cls_position": "last"}
            _deprecated(
                "model.tokenizer.name: image_patches_cls_last",
                "it is image_patches with kwargs {cls_position: last}; a causal_vit backbone builds it itself (leave "
                "model.tokenizer.name null) and a ViT moves its own class token last",
            )
    train = raw.get("train")
    if isinstance(train, dict) and "label_smoothing" in train:
        task = raw.get("task")
        task = {"name": task} if isinstance(task, str) else dict(task or {})
        task.setdefault("label_smoothing", train.pop("label_smoothing"))
        raw["task"] = task
        _deprecated("train.label_smoothing", "the classification task's option: task.label_smoothing")
    return raw
