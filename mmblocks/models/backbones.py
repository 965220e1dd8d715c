"""The ``vit`` backbone: timm's own ViT blocks, reused as they are (never rewritten)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import timm
from torch import nn

from tokenizers_mm import ImagePatches

from .base import BackboneBase
from .registry import register_backbone

__all__ = ["TimmViT", "create_timm_vit", "vit"]


def create_timm_vit(
    name: str = "vit_tiny_patch16_224", *, checkpoint_path: str | os.PathLike | None = None, **kwargs: Any
) -> nn.Module:
    """`timm.create_model(name, pretrained=False, ...)` as a headless, dynamic-size ViT.

    `kwargs` go to timm (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``,
    ``reg_tokens``, ...). `checkpoint_path` loads local weights (safetensors or a weights-only torch file) through
    timm's loader; nothing is downloaded.
    """
    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}; e.g. {timm.list_models('vit_*')[:8]} (timm.list_models())")
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **kwargs}
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint_path is not None:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"backbone checkpoint {checkpoint_path} does not exist")
        timm.models.load_checkpoint(model, str(checkpoint_path), strict=False)
    for attr in ("blocks", "norm", "patch_embed"):
        if not hasattr(model, attr):
            raise ValueError(f"timm model {name!r} has no `{attr}`: a ViT-style model (VisionTransformer) is needed")
    return model


class TimmViT(BackboneBase):
    """The transformer part of a timm `VisionTransformer`: its `norm_pre`, its blocks and its final norm.

    The tokenizer (`ImagePatches.from_timm`) takes the patch embedding; `MMEncoder` runs the blocks, inserts the
    LLM stage and applies `norm` itself, so the final norm stays where the center paper needs it.

    Args:
        name: a timm ViT name (``vit_tiny_patch16_224``, ``vit_small_patch16_224``, ...).
        checkpoint_path: optional local weights.
        vit: an already built timm `VisionTransformer` to wrap (its modules are shared, not copied).
        image_tokenizer: keep the ViT's patch embedding for `make_tokenizer`; False drops it (the blocks serve
            another modality's tokenizer: AST audio patches, VideoMAE tubelets, motion).
        tokenizer_factory: without the image tokenizer, builds this backbone's own tokenizer on `make_tokenizer`
            (AST's spectrogram patches, VideoMAE's tubelets), with the keyword arguments given there overriding.
        readout: the head pooling that reads this backbone's summary (default: ``cls``, or ``mean`` for a ViT
            without class token).
        kwargs: timm model arguments (custom depth / width / image and patch size).
    """

    def __init__(
        self,
        name: str = "vit_tiny_patch16_224",
        checkpoint_path: str | None = None,
        *,
        vit: nn.Module | None = None,
        image_tokenizer: bool = True,
        tokenizer_factory: Callable[..., nn.Module] | None = None,
        readout: str | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        if vit is None:
            vit = create_timm_vit(name, checkpoint_path=checkpoint_path, **kwargs)
        self.name = name
        self.embed_dim = vit.embed_dim
        self.norm_pre = vit.norm_pre
        self.blocks = nn.ModuleList(list(vit.blocks))
        self.norm = vit.norm
        self._tokenizer = ImagePatches.from_timm(vit) if image_tokenizer else None
        self.tokenizer_factory = tokenizer_factory
        self.readout = readout or ("mean" if image_tokenizer and getattr(vit, "cls_token", None) is None else "cls")
        self.timm_config = {"name": name, **kwargs}

    @classmethod
    def from_timm(cls, vit: nn.Module) -> TimmViT:
        """Wrap an already built timm `VisionTransformer` (its modules are shared, not copied)."""
        return cls(type(vit).__name__, vit=vit)

    def make_tokenizer(self, **kwargs: Any) -> nn.Module:
        """The ViT's own `image_patches` tokenizer (its patch embedding, tokens and positions; sized by the ViT, so
        its only option is ``cls_position``: ``last`` moves the class token after the patches and reads it out
        there), or the tokenizer of `tokenizer_factory` built with `kwargs`."""
        if self._tokenizer is not None:
            sizes = sorted(k for k in kwargs if k != "cls_position")
            if sizes:
                raise ValueError(
                    "the image tokenizer is the ViT's own patch embedding: set its size on the backbone (img_size, "
                    f"patch_size, ...), not as tokenizer arguments {sizes}"
                )
            if "cls_position" in kwargs:
                self._tokenizer.set_cls_position(kwargs["cls_position"])
                self.readout = "last" if kwargs["cls_position"] == "last" else "cls"
            return self._tokenizer
        if self.tokenizer_factory is not None:
            return self.tokenizer_factory(**kwargs)
        raise ValueError("this TimmViT was built with image_tokenizer=False: it has no patch embedding")

    def extra_repr(self) -> str:
        return f"name={self.name}, depth={self.depth}, embed_dim={self.embed_dim}"


@register_backbone("vit", tokenizer="image_patches", flag="own_tokenizer")
def vit(
    timm_model: str = "vit_tiny_patch16_224",
    *,
    img_size: int | None = None,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    drop_path_rate: float = 0.0,
    reg_tokens: int = 0,
    class_token: bool = True,
    no_embed_class: bool = False,
    checkpoint_path: str | None = None,
    in_chans: int = 3,
    own_tokenizer: bool = True,
) -> TimmViT:
    """A timm ViT (`timm_model`, resized by the other arguments when given) as a backbone.

    With ``own_tokenizer`` it keeps its patch embedding (images with `in_chans` channels; `reg_tokens`, `class_token`
    and `no_embed_class` shape its token layout; no class token pools by average); without, its blocks serve another
    modality's tokenizer (AST-style audio patches, tubelets, motion) and the image sizes are unused. A config names it
    by any timm ViT name (``model.backbone.name: vit_small_patch16_224``) or as ``vit`` with ``timm_model``.
    """
    sizes = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    kwargs: dict[str, Any] = {k: v for k, v in {**sizes, "mlp_ratio": mlp_ratio}.items() if v is not None}
    kwargs["drop_path_rate"] = drop_path_rate
    if not own_tokenizer:
        for key in ("img_size", "patch_size"):  # sizes belong to the other tokenizer
            kwargs.pop(key, None)
        return TimmViT(timm_model, checkpoint_path=checkpoint_path, image_tokenizer=False, **kwargs)
    kwargs.update(reg_tokens=reg_tokens, class_token=class_token, no_embed_class=no_embed_class, in_chans=in_chans)
    if not class_token:
        kwargs["global_pool"] = "avg"
    return TimmViT(timm_model, checkpoint_path=checkpoint_path, **kwargs)
