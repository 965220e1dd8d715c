"""Config keys and values renamed since earlier releases, rewritten into today's with a warning naming the new key."""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["ConfigDeprecationWarning", "migrate"]


class ConfigDeprecationWarning(FutureWarning):
    """A renamed config key or value was used: the config still loads; the message names the new key."""


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"config key {old} is deprecated: {new}", ConfigDeprecationWarning, stacklevel=4)


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
            _deprecated(
                "model.backbone.type",
                f"name the backbone with model.backbone.name (here {backbone.get('name', 'vit_tiny_patch16_224')!r}; "
                "a registered backbone or a timm ViT name)",
            )
        tokenizer = model.get("tokenizer")
        if isinstance(tokenizer, dict) and tokenizer.get("name") == "image_patches_cls_last":
            own = isinstance(backbone, dict) and backbone.get("name") in (None, "causal_vit")
            tokenizer["name"] = None if own else "image_patches"
            if not own:
                tokenizer["kwargs"] = {**(tokenizer.get("kwargs") or {}), "cls_position": "last"}
            _deprecated(
                "model.tokenizer.name: image_patches_cls_last",
                "it is image_patches with kwargs {cls_position: last} (a causal_vit backbone builds it itself: "
                "leave model.tokenizer.name null)",
            )
    train = raw.get("train")
    if isinstance(train, dict) and "label_smoothing" in train:
        task = raw.get("task")
        task = {"name": task} if isinstance(task, str) else dict(task or {})
        task.setdefault("label_smoothing", train.pop("label_smoothing"))
        raw["task"] = task
        _deprecated("train.label_smoothing", "the classification task's option: task.label_smoothing")
    return raw
